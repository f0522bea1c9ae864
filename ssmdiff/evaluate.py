"""Sample evaluation: class accuracy, Frechet distance, KID, precision/recall, Inception score.

Two feature spaces:
- ``digits``: the penultimate layer of a small CNN trained (deterministically, in seconds) on the built-in digits'
  training split and cached on disk; used for the default job, fully offline.
- ``inception``: Inception-v3 (the FID-standard weights, through torchmetrics/torch-fidelity's extractor), used only
  when the user gives a local weights file or explicitly allows the download.

The metric formulas (Frechet distance, unbiased KID, k-NN precision/recall of Kynkaanniemi et al. 2019) work on
feature arrays and are checked against closed forms and against torchmetrics in the tests.
"""

from __future__ import annotations

import os
import re
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFIER_VERSION = 2
_CLASSIFIER_MEMO: dict = {}


# ------------------------------------------------------------------------------------------- digit classifier


class DigitClassifier(nn.Module):
    """Small CNN for 8x8 digits in [-1, 1]; ``features`` is the 128-d penultimate layer used for FD/KID/PR."""

    num_features = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Any NCHW float images in [-1, 1] -> (N, 1, 8, 8): channel mean, then antialiased resize to 8x8."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            if x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0:
                x = F.adaptive_avg_pool2d(x, 8)  # box filter: the natural inverse of integer upsampling
            else:
                x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _DigitFeatures(nn.Module):
    """Feature-extractor view of the classifier (``num_features`` attribute, as torchmetrics expects)."""

    num_features = DigitClassifier.num_features

    def __init__(self, clf: DigitClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf.features(x)


def cache_dir() -> str:
    """``$SSMDIFF_CACHE`` or ``~/.cache/ssmdiff``."""
    return os.path.expanduser(os.environ.get("SSMDIFF_CACHE") or os.path.join("~", ".cache", "ssmdiff"))


def _shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (background is -1): makes the classifier robust to off-centre samples."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    return out


def train_digit_classifier(epochs: int = 20, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train the classifier on the digits train split (deterministic); returns it and its held-out accuracy.

    Runs on one thread: the network is tiny, so extra threads only add synchronisation (7x slower on a busy
    2-core machine), and a fixed thread count keeps the weights identical from machine to machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_digit_classifier(epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_digit_classifier(epochs: int, seed: int) -> tuple[DigitClassifier, float]:
    from .data.datasets import digits_split
    from .data.transforms import resize_float

    xtr, ytr = digits_split("train")
    xte, yte = digits_split("test")
    xtr = torch.from_numpy(xtr / 8.0 - 1.0).float()[:, None]
    xte = torch.from_numpy(xte / 8.0 - 1.0).float()[:, None]
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = (len(ytr) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            xb = _shift_augment(xtr[idx], gen)
            if torch.rand((), generator=gen) < 0.5:
                # Samples made at 16/24/32 px and resized back are slightly blurred: learn to ignore that.
                size = int(torch.randint(2, 5, (), generator=gen)) * 8
                xb = DigitClassifier.prepare(resize_float(xb, size))
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return model, acc


def get_digit_classifier(retrain: bool = False) -> DigitClassifier:
    """The cached digit classifier (trained and written atomically on first use, or when the cache is corrupt)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(cache_dir(), f"digit_classifier_v{CLASSIFIER_VERSION}.safetensors")
    if not retrain and path in _CLASSIFIER_MEMO:
        return _CLASSIFIER_MEMO[path]
    model = None
    if not retrain and os.path.exists(path):
        try:
            model = DigitClassifier()
            model.load_state_dict(load_file(path), strict=True)
        except Exception:  # truncated/corrupt/foreign file: rebuild it rather than fail the evaluation
            model = None
    if model is None:
        with torch.enable_grad():  # callers often run under no_grad
            model, acc = train_digit_classifier()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp,
                  metadata={"version": str(CLASSIFIER_VERSION), "heldout_accuracy": f"{acc:.4f}"})
        os.replace(tmp, path)
    model.eval().requires_grad_(False)
    _CLASSIFIER_MEMO[path] = model
    return model


# ------------------------------------------------------------------------------------------- metric formulas


def feature_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of features (N, D)."""
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) between Gaussians N(mu1, S1) and N(mu2, S2).

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2, which is
    symmetric PSD: exact, and stable for singular covariances (more features than samples) where sqrtm is not.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_cross = np.sqrt(np.clip(ev, 0, None)).sum()
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_cross)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree=3, gamma=None, coef=1.0) -> np.ndarray:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree=3, gamma=None, coef=1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel (x.y/d + 1)^3 (the KID estimator of Binkowski et al. 2018)."""
    m, n = x.shape[0], y.shape[0]
    kxx = _poly_kernel(x, x, degree, gamma, coef)
    kyy = _poly_kernel(y, y, degree, gamma, coef)
    kxy = _poly_kernel(x, y, degree, gamma, coef)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_distance(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of unbiased MMD^2 over ``subsets`` random subsets of ``subset_size`` from each set."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 images on each side")
    rng = np.random.default_rng(seed)
    # Kernel matrices once over the full sets (when they fit), then each subset is an index into them: the same
    # estimator as recomputing per subset, without 3 matmuls per subset.
    if len(real) <= 5000 and len(fake) <= 5000:
        krr, kff, krf = _poly_kernel(real, real), _poly_kernel(fake, fake), _poly_kernel(real, fake)
        vals = []
        for _ in range(subsets):
            i = rng.choice(len(real), size, replace=False)
            j = rng.choice(len(fake), size, replace=False)
            a, b, c = krr[np.ix_(i, i)], kff[np.ix_(j, j)], krf[np.ix_(i, j)]
            vals.append((a.sum() - np.trace(a)) / (size * (size - 1)) + (b.sum() - np.trace(b)) / (size * (size - 1))
                        - 2 * c.mean())
    else:
        vals = [mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                              fake[rng.choice(len(fake), size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def _knn_radii(x: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(out)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 256) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius): the k-NN manifold estimate."""
    inside = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        inside.append((d <= radii[None, :]).any(1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) with k-NN hyperspheres (k=3 as in the paper).

    precision = share of fake samples inside the real manifold; recall = share of real samples inside the fake one.
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples on each side")
    return _coverage(f, r, _knn_radii(r, k)), _coverage(r, f, _knn_radii(f, k))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) averaged over ``splits`` chunks: mean and std."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for part in np.array_split(probs, min(splits, len(probs))):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------- image inputs


_CLASS_IN_NAME = re.compile(r"_class(\d+)")


def load_image_batch(path: str, max_items: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read images for evaluation: a folder of images (PNG etc.), an ``.npz`` (``arr_0`` uint8 NHWC, the ADM suite
    format, or ``images``), or one image file. Returns (float NCHW in [-1, 1], labels or None).

    Labels come from the ``labels``/``arr_1`` array of an ``.npz``, or from ``_class{k}`` in every file name (the
    sampler's naming).
    """
    from PIL import Image

    from .data.datasets import IMAGE_EXTENSIONS, _list_images, load_npz_dataset
    from .data.transforms import pil_to_uint8

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: give a folder of images, an .npz or an image file")
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        ds = load_npz_dataset(path)
        n = len(ds) if max_items is None else min(max_items, len(ds))
        x = ds.data[:n]
        x = x.float().div(127.5).sub(1) if x.dtype == torch.uint8 else x.float()
        has_labels = ds.num_classes > 0
        return x, (torch.from_numpy(ds.labels[:n]) if has_labels else None)
    files = [path] if os.path.isfile(path) else _list_images(path)
    if os.path.isfile(path) and not path.lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError(f"{path}: not an image or .npz file")
    if not files:
        raise ValueError(f"no images in {path}")
    files = files[:max_items] if max_items else files
    arrs, size, channels = [], None, None
    for f in files:
        try:
            with Image.open(f) as img:
                if channels is None:
                    channels = 1 if img.mode in ("L", "1", "I", "F", "I;16") else 3
                arr = pil_to_uint8(img, channels)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {f}: {e}") from None
        if size is None:
            size = arr.shape
        elif arr.shape != size:
            raise ValueError(f"{f} is {arr.shape[1]}x{arr.shape[0]} but {files[0]} is {size[1]}x{size[0]}; "
                             "images to evaluate must all have the same size")
        arrs.append(arr)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    ms = [_CLASS_IN_NAME.search(os.path.basename(f)) for f in files]
    labels = torch.tensor([int(m.group(1)) for m in ms]) if all(ms) else None
    return x, labels


def _as_images(images) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(images, str):
        return load_image_batch(images)
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            if images.ndim == 3:
                images = images[..., None]
            return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1), None
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            raise ValueError("uint8 tensors are ambiguous; pass float NCHW in [-1, 1] or a uint8 NHWC numpy array")
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
        return images.float().cpu(), None
    raise TypeError(f"images must be a path, a float tensor or a uint8 NHWC array, not {type(images).__name__}")


def _batches(x: torch.Tensor, bs: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], bs):
        yield x[i:i + bs]


# ------------------------------------------------------------------------------------------- feature extractors


@torch.no_grad()
def digit_features(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 512):
    """(features (N, 128), class probabilities (N, 10)) from the cached digit classifier."""
    clf = get_digit_classifier()
    batches = _batches(images, batch_size) if isinstance(images, torch.Tensor) else images
    feats, probs = [], []
    for xb in batches:
        f = clf.features(xb.float().cpu())
        feats.append(f)
        probs.append(clf.head(f).softmax(1))
    return torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()


class InceptionFeatures:
    """Inception-v3 (2048-d pool features + unbiased logits) through torchmetrics' torch-fidelity extractor.

    Weights come from ``weights_path`` (torch-fidelity's ``pt_inception-2015-12-05`` file), or are downloaded by
    torch-fidelity only when ``allow_download`` is set.
    """

    def __init__(self, weights_path: str | None = None, allow_download: bool = False, device="cpu"):
        if weights_path is None and not allow_download:
            raise ValueError("Inception features need weights: pass a local file with inception_weights= "
                             "(--inception-weights PATH, torch-fidelity's pt_inception-2015-12-05 .pth) or allow the "
                             "download explicitly with allow_download=True (--allow-download). For the built-in "
                             "digits use reference='digits' (offline classifier features).")
        if weights_path is not None and not os.path.isfile(weights_path):
            raise FileNotFoundError(f"Inception weights file {weights_path} not found")
        try:
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError:
            _TORCH_FIDELITY_AVAILABLE = False
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError("Inception features need torchmetrics and torch-fidelity (with torchvision): "
                              "pip install torchmetrics 'ssmdiff[metrics]'. "
                              "Without them use the digit-classifier features (reference='digits').")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=weights_path).to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, batches: Iterable[torch.Tensor]):
        feats, probs = [], []
        for xb in batches:
            if xb.shape[1] == 1:
                xb = xb.repeat(1, 3, 1, 1)
            u8 = ((xb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(self.device)
            f, logits = self.net(u8)
            feats.append(f.double().cpu())
            probs.append(logits.double().softmax(1).cpu())
        return torch.cat(feats).numpy(), torch.cat(probs).numpy()


# ------------------------------------------------------------------------------------------- evaluation


DIGIT_METRICS = ("accuracy", "fd", "kid", "pr", "is")
NATURAL_METRICS = ("fid", "kid", "is", "pr")


def _reference_images(reference, image_size: int | None, max_reference: int | None):
    """Reference spec -> (float NCHW images, labels or None, description)."""
    from .data import build_dataset, dataset_tensor

    if isinstance(reference, (torch.Tensor, np.ndarray)):
        x, y = _as_images(reference)
        return x, y, "array"
    if not isinstance(reference, str):
        raise TypeError("reference must be a path/spec string or an image array")
    if reference.startswith("digits"):
        split = reference.partition(":")[2] or "test"
        # At the samples' resolution: a model trained at 16x16 learns the upsampled digits, and the classifier's
        # way back to 8x8 does not undo the upsampling exactly, so 8x8 references would penalise a perfect model.
        ds = build_dataset("digits", split=split, image_size=image_size)
        x, y = dataset_tensor(ds, max_reference)
        return x, y, f"digits:{split}"
    if reference.lower().endswith(".npz") or (os.path.isdir(reference) and not any(
            os.path.isdir(os.path.join(reference, d)) for d in os.listdir(reference))
            and not os.path.exists(os.path.join(reference, "data_batch_1"))
            and not os.path.exists(os.path.join(reference, "test_batch"))):
        x, y = load_image_batch(reference, max_reference)
        return x, y, reference
    ds = build_dataset(reference, image_size=image_size)
    x, y = dataset_tensor(ds, max_reference)
    return x, y, reference


def evaluate_samples(images, labels=None, reference="digits", metrics: Sequence[str] | None = None, *,
                     feature: str = "auto", inception_weights: str | None = None, allow_download: bool = False,
                     device="cpu", batch_size: int = 256, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     pr_k: int = 3, max_reference: int | None = 50000, floor: bool = True, seed: int = 0) -> dict:
    """Evaluate generated ``images`` against ``reference``; returns a JSON-serialisable dict.

    images: float NCHW in [-1, 1], uint8 NHWC array, or a path (folder of images or ``.npz``). labels: the class
    each sample was asked for (read from the path when absent: ``labels`` in the .npz or ``_class{k}`` names).
    reference: "digits" (held-out split; also "digits:train"), a folder, an ``.npz`` or any dataset spec.
    metrics: subset of accuracy, fd/fid, kid, pr, is (default: all that apply to the feature space).
    feature: "digits", "inception" or "auto" (digits when the reference is the built-in digits).
    With digit features and ``floor``, the same metrics between real training digits (as many as samples) and the
    held-out reference are reported as ``*_floor``: the value a perfect generator would get at this sample size.
    """
    if feature == "digits" or (feature == "auto" and isinstance(reference, str) and reference.startswith("digits")):
        # Everything here is tiny (8x8 inputs, 128-d features): one thread avoids oversubscription slowdowns
        # (measured 25x on a busy 2-core machine) and costs nothing on an idle one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _evaluate(images, labels, reference, metrics, feature, inception_weights, allow_download,
                             device, batch_size, kid_subsets, kid_subset_size, pr_k, max_reference, floor, seed)
        finally:
            torch.set_num_threads(threads)
    return _evaluate(images, labels, reference, metrics, feature, inception_weights, allow_download, device,
                     batch_size, kid_subsets, kid_subset_size, pr_k, max_reference, floor, seed)


def _evaluate(images, labels, reference, metrics, feature, inception_weights, allow_download, device, batch_size,
              kid_subsets, kid_subset_size, pr_k, max_reference, floor, seed) -> dict:
    t0 = time.time()
    x, file_labels = _as_images(images)
    if labels is None:
        labels = file_labels
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for {len(x)} images")
    if len(x) < 2:
        raise ValueError("need at least 2 images to evaluate")
    if feature == "auto":
        feature = "digits" if isinstance(reference, str) and reference.startswith("digits") else "inception"
    if feature not in ("digits", "inception"):
        raise ValueError(f"feature must be 'digits', 'inception' or 'auto', not {feature!r}")
    metrics = list(metrics) if metrics else list(DIGIT_METRICS if feature == "digits" else NATURAL_METRICS)
    metrics = ["fd" if m == "fid" else m for m in metrics]
    unknown = set(metrics) - set(DIGIT_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from accuracy, fd (fid), kid, pr, is")

    if feature == "digits":
        extract = lambda t: digit_features(t, batch_size)  # noqa: E731
    else:
        inc = InceptionFeatures(inception_weights, allow_download, device)
        extract = lambda t: inc(_batches(t, batch_size))  # noqa: E731
    ref_x, ref_y, ref_desc = _reference_images(reference, x.shape[-1], max_reference)

    out: dict = {"num_samples": int(len(x)), "reference": ref_desc, "num_reference": int(len(ref_x)),
                 "feature_space": "digit-classifier" if feature == "digits" else "inception-v3"}
    fx, px = extract(x)
    fr, pr_ref = extract(ref_x)

    def compare(fa, fb, pa, prefix=""):
        res = {}
        name = "fd" if feature == "digits" else "fid"
        if "fd" in metrics:
            res[prefix + name] = frechet_distance_features(fb, fa)
        if "kid" in metrics:
            m, s = kernel_distance(fb, fa, kid_subsets, kid_subset_size, seed)
            res[prefix + "kid_mean"], res[prefix + "kid_std"] = m, s
        if "pr" in metrics:
            p, r = precision_recall(fb, fa, pr_k)
            res[prefix + "precision"], res[prefix + "recall"] = p, r
        if "is" in metrics:
            m, s = inception_score(pa)
            res[prefix + "is_mean"], res[prefix + "is_std"] = m, s
        return res

    if "accuracy" in metrics:
        if feature != "digits":
            raise ValueError("class accuracy needs the digit classifier (feature='digits')")
        pred = torch.from_numpy(px.argmax(1))
        out["predicted_class_counts"] = np.bincount(pred.numpy(), minlength=10).tolist()
        if labels is not None:
            ok = pred == labels
            out["accuracy"] = ok.double().mean().item()
            out["per_class_accuracy"] = {str(int(k)): ok[labels == k].double().mean().item()
                                         for k in torch.unique(labels)}
        if ref_y is not None:
            # The classifier's own accuracy on real reference digits: the ceiling for "accuracy" above.
            out["reference_accuracy"] = float((pr_ref.argmax(1) == ref_y.numpy()).mean())
    out.update(compare(fx, fr, px))
    if floor and feature == "digits":
        from .data import build_dataset, dataset_tensor

        tr_x, tr_y = dataset_tensor(build_dataset("digits", split="train" if ref_desc != "digits:train" else "test",
                                                  image_size=x.shape[-1]))
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(tr_x), generator=g)[:len(x)]
        ft, pt = extract(tr_x[idx])
        out.update(compare(ft, fr, pt, prefix="floor_"))
        out["floor_num_samples"] = int(len(idx))
    out["seconds"] = round(time.time() - t0, 3)
    return out
