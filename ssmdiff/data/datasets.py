"""Image datasets: the built-in digits, image folders, CIFAR-10 python batches, ``.npz`` arrays and Hugging Face.

Every dataset yields ``(image, label)`` with ``image`` float32 CHW in [-1, 1] and ``label`` a long scalar, and
exposes ``num_classes`` (0 = unlabelled), ``channels``, ``image_size``, ``class_names`` and ``num_skipped``.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .transforms import convert_channels, pil_to_uint8, resize_center_crop, resize_float, uint8_to_float

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# Folders up to this many files are fully decoded when the dataset is built, so that a corrupt file is found
# before training starts; bigger folders only have their headers checked up front (decoding ImageNet twice
# would take hours) and a file that still fails later raises the same clear error from __getitem__.
FULL_VERIFY_LIMIT = 20000


class ImageDataset(Dataset):
    """Base class: common attributes and the random horizontal flip (train-time augmentation)."""

    def __init__(self, *, num_classes: int, channels: int, image_size: int, class_names=None, hflip=False,
                 source: str = "", split: str = "train", num_skipped: int = 0):
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.class_names = list(class_names) if class_names is not None else None
        self.hflip = bool(hflip)
        self.source = source
        self.split = split
        self.num_skipped = int(num_skipped)

    def _get(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def __getitem__(self, index: int):
        x, y = self._get(int(index))
        # torch's global RNG: seeded by the trainer and per DataLoader worker, so flips are reproducible.
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(int(y), dtype=torch.long)

    @property
    def labels(self) -> np.ndarray:
        """All labels as an int64 array (zeros when unlabelled)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-friendly summary (recorded in run configs and latent manifests)."""
        return {"source": self.source, "split": self.split, "num_items": len(self), "num_classes": self.num_classes,
                "channels": self.channels, "image_size": self.image_size, "class_names": self.class_names,
                "num_skipped": self.num_skipped}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, channels={self.channels}, size={self.image_size})")


class TensorImageDataset(ImageDataset):
    """Images held in memory: uint8 NCHW (converted per item, 4x less memory) or float NCHW in [-1, 1]."""

    def __init__(self, data: torch.Tensor, labels: np.ndarray, **kw):
        if data.ndim != 4:
            raise ValueError(f"expected NCHW images, got shape {tuple(data.shape)}")
        super().__init__(channels=data.shape[1], image_size=data.shape[-1], **kw)
        self.data = data
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return self.data.shape[0]

    def _get(self, index):
        x = self.data[index]
        x = uint8_to_float(x) if x.dtype == torch.uint8 else x.float()
        return x, self._labels[index]

    @property
    def labels(self) -> np.ndarray:
        return self._labels


# ----------------------------------------------------------------------------------------------- digits


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The built-in digits as float images (N, 8, 8) in [0, 16] and labels, for ``split`` "train" / "test" / "all".

    The held-out split is a fixed stratified 20% (seed 0), so every run and the evaluator agree on it.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images, labels = d.images.astype(np.float32), d.target.astype(np.int64)
    if split == "all":
        return images, labels
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
                                           stratify=labels)
    if split == "train":
        sel = np.sort(train_idx)
    elif split in ("test", "val", "validation", "heldout"):
        sel = np.sort(test_idx)
    else:
        raise ValueError(f"unknown split {split!r} for the digits dataset; use 'train', 'test' or 'all'")
    return images[sel], labels[sel]


def load_digits_dataset(image_size=None, split="train", hflip=False, channels=None) -> TensorImageDataset:
    """scikit-learn's 1797 8x8 handwritten digits, values 0..16 mapped linearly to [-1, 1], 10 classes."""
    images, labels = digits_split(split)
    x = torch.from_numpy(images / 8.0 - 1.0).float()[:, None]
    if channels not in (None, 1, 3):
        raise ValueError(f"digits can be given 1 or 3 channels, not {channels}")
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    if image_size is not None and image_size != 8:
        x = resize_float(x, int(image_size)).clamp_(-1, 1)
    return TensorImageDataset(x, labels, num_classes=10, class_names=[str(i) for i in range(10)], hflip=hflip,
                              source="digits", split=split)


# ----------------------------------------------------------------------------------------------- folders


def _list_images(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    return out


def _check_image(path: str, full: bool) -> tuple[str, tuple[int, int]]:
    """Open ``path`` (decoding everything when ``full``); returns (mode, size) or raises ValueError naming it."""
    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            if full:
                img.load()
            else:
                img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Delete or replace this file, or pass skip_bad=True "
                         "(--skip-bad) to skip unreadable images.") from None
    return mode, size


_ONE_BAND = {"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageFolderDataset(ImageDataset):
    """Images under ``root``: one sub-folder per class (sorted names = label ids), or a flat unlabelled folder."""

    def __init__(self, root: str, image_size=None, split="train", hflip=False, channels=None, skip_bad=False):
        root = os.path.abspath(os.path.expanduser(root))
        subdirs = sorted(d for d in os.listdir(root)
                         if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        files, labels, class_names = [], [], None
        classed = [d for d in subdirs if _list_images(os.path.join(root, d))]
        if classed:
            class_names = classed
            for k, d in enumerate(classed):
                fs = _list_images(os.path.join(root, d))
                files += fs
                labels += [k] * len(fs)
            top = [f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS)]
            if top:
                warnings.warn(f"{root}: {len(top)} image(s) at the top level are ignored because class sub-folders "
                              "exist (each sub-folder is one class)")
        else:
            files = _list_images(root)
            labels = [0] * len(files)
        if not files:
            raise ValueError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, in class "
                             "sub-folders or directly in the folder). Point to a folder that contains images.")

        full = len(files) <= FULL_VERIFY_LIMIT
        keep, keep_labels, modes, sizes, skipped = [], [], [], [], []
        for f, y in zip(files, labels):
            try:
                mode, size = _check_image(f, full)
            except ValueError:
                if not skip_bad:
                    raise
                skipped.append(f)
                continue
            keep.append(f)
            keep_labels.append(y)
            modes.append(mode)
            sizes.append(size)
        if skipped:
            warnings.warn(f"{root}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
        if not keep:
            raise ValueError(f"no readable images in {root} ({len(skipped)} unreadable skipped)")

        if channels is None:
            channels = 1 if all(m in _ONE_BAND for m in modes) else 3
        if channels not in (1, 3):
            raise ValueError(f"{root}: channels must be 1 (grey) or 3 (RGB), not {channels}")
        if image_size is None:
            distinct = sorted(set(sizes))
            if len(distinct) > 1:
                i = next(i for i, s in enumerate(sizes) if s != sizes[0])
                raise ValueError(
                    f"{root}: images have different sizes ({keep[0]} is {sizes[0][0]}x{sizes[0][1]}, {keep[i]} is "
                    f"{sizes[i][0]}x{sizes[i][1]}). Pass image_size (--image-size) to resize and centre-crop them.")
            w, h = distinct[0]
            if w != h:
                raise ValueError(f"{root}: images are {w}x{h}, not square. Pass image_size (--image-size) to resize "
                                 "and centre-crop them.")
            image_size = w
        self.files = keep
        self._labels = np.asarray(keep_labels, dtype=np.int64)
        super().__init__(num_classes=len(class_names) if class_names else 0, channels=channels,
                         image_size=image_size, class_names=class_names, hflip=hflip, source=root, split=split,
                         num_skipped=len(skipped))
        self.skipped_files = skipped

    def __len__(self):
        return len(self.files)

    def _get(self, index):
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img = resize_center_crop(img.convert("RGB" if self.channels == 3 else "L"), self.image_size)
                arr = pil_to_uint8(img, self.channels)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}. Delete or replace this file, or rebuild the dataset "
                             "with skip_bad=True (--skip-bad).") from None
        return uint8_to_float(torch.from_numpy(arr).permute(2, 0, 1)), self._labels[index]

    @property
    def labels(self):
        return self._labels


# ----------------------------------------------------------------------------------------------- arrays


def _array_dataset(images: np.ndarray, labels, *, where: str, image_size, channels, hflip, split, num_classes=None,
                   class_names=None) -> TensorImageDataset:
    """uint8 NHWC / float NCHW (or N,H,W grey) arrays -> TensorImageDataset, resized and channel-converted."""
    if images.ndim == 3:
        images = images[..., None] if images.dtype == np.uint8 else images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{where}: expected images of shape (N, H, W, C) uint8 or (N, C, H, W) float, "
                         f"got {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{where}: the array holds no images")
    if images.dtype == np.uint8:
        nhwc = images
    elif np.issubdtype(images.dtype, np.floating):
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"{where}: float images must lie in [-1, 1] (found {lo:.3g}..{hi:.3g}); store uint8 "
                             "NHWC images or rescale the floats to [-1, 1]")
        nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1)) if images.shape[1] in (1, 3, 4) \
            and images.shape[-1] not in (1, 3) else images
    else:
        raise ValueError(f"{where}: images must be uint8 (N, H, W, C) or float (N, C, H, W), got dtype {images.dtype}")
    nhwc = convert_channels(nhwc, channels, where)
    n, h, w, c = nhwc.shape
    if labels is None:
        labels = np.zeros(n, dtype=np.int64)
        k = 0
    else:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"{where}: {len(labels)} labels for {n} images")
        if labels.min() < 0:
            raise ValueError(f"{where}: labels must be non-negative class ids")
        k = int(labels.max()) + 1 if num_classes is None else num_classes
    if nhwc.dtype == np.uint8:
        if image_size is not None and (h, w) != (image_size, image_size):
            mode = "L" if c == 1 else "RGB"
            nhwc = np.stack([pil_to_uint8(resize_center_crop(Image.fromarray(a[..., 0] if c == 1 else a, mode),
                                                              image_size), c) for a in nhwc])
        elif h != w:
            raise ValueError(f"{where}: images are {w}x{h}, not square; pass image_size to centre-crop them")
        data = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))
    else:
        data = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))).float()
        if h != w:
            raise ValueError(f"{where}: images are {w}x{h}, not square")
        if image_size is not None:
            data = resize_float(data, image_size).clamp_(-1, 1)
    return TensorImageDataset(data, labels, num_classes=k, class_names=class_names, hflip=hflip, source=where,
                              split=split)


def load_npz_dataset(path, image_size=None, split="train", hflip=False, channels=None) -> TensorImageDataset:
    """``.npz`` with ``arr_0`` (the ADM suite format) or ``images`` (+ optional ``labels``/``arr_1``) arrays."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.keys() if k in ("images", "labels", "arr_0", "arr_1")}
            keys = list(z.keys())
    except Exception as e:  # zipfile.BadZipFile, pickled object arrays, truncated files...
        raise ValueError(f"cannot read {path} as an .npz archive of arrays: {e}") from None
    if "images" in arrays:
        images, labels = arrays["images"], arrays.get("labels")
    elif "arr_0" in arrays:
        images, labels = arrays["arr_0"], arrays.get("labels", arrays.get("arr_1"))
    else:
        raise ValueError(f"{path}: no image array found (keys: {keys}). Save the images under 'arr_0' or "
                         "'images' (uint8 N,H,W,C or float N,C,H,W in [-1, 1]) and labels under 'labels'.")
    return _array_dataset(images, labels, where=path, image_size=image_size, channels=channels, hflip=hflip,
                          split=split)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batch files: plain containers and numpy arrays only, never arbitrary callables."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"),
        # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1"): data, no code.
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batch files hold only arrays and "
                                     "lists")


def _load_cifar_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot read CIFAR batch file {path}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch file (expected a dict of 'data' and 'labels')")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def is_cifar_folder(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, "data_batch_1"))
                                    or os.path.exists(os.path.join(path, "test_batch")))


def load_cifar_dataset(folder, image_size=None, split="train", hflip=False, channels=None) -> TensorImageDataset:
    """CIFAR-10 python version (``data_batch_1..5`` for train, ``test_batch`` for test, ``batches.meta``)."""
    if split == "train":
        names = [f"data_batch_{i}" for i in range(1, 6)]
    elif split in ("test", "val", "validation"):
        names = ["test_batch"]
    else:
        raise ValueError(f"unknown split {split!r} for CIFAR-10; use 'train' or 'test'")
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder}: missing CIFAR-10 batch file(s) {', '.join(missing)} for split "
                                f"{split!r}. Extract cifar-10-python.tar.gz so that the folder holds all of them.")
    datas, labels = [], []
    for n in names:
        path = os.path.join(folder, n)
        d = _load_cifar_pickle(path)
        data = d.get("data")
        lab = d.get("labels", d.get("fine_labels"))
        if not isinstance(data, np.ndarray) or lab is None:
            raise ValueError(f"{path}: not a CIFAR batch (needs 'data' array and 'labels')")
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise ValueError(f"{path}: 'data' should be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
        datas.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(lab, dtype=np.int64))
    class_names = None
    meta = os.path.join(folder, "batches.meta")
    if os.path.exists(meta):
        names_b = _load_cifar_pickle(meta).get("label_names")
        if names_b:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names_b]
    images = np.concatenate(datas)
    return _array_dataset(images, np.concatenate(labels), where=folder, image_size=image_size, channels=channels,
                          hflip=hflip, split=split, num_classes=10, class_names=class_names)


# ----------------------------------------------------------------------------------------------- Hugging Face


def _as_pil(img) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))


class HFImageDataset(ImageDataset):
    """A Hugging Face ``datasets`` split with an image column and an optional ClassLabel column.

    ``name`` is a hub dataset (downloaded by ``datasets`` into its cache when the user names it) or a local folder
    written by ``save_to_disk``.
    """

    def __init__(self, name: str, split="train", image_size=None, hflip=False, channels=None):
        try:
            import datasets as hfds
        except ImportError:
            raise ImportError(f"the spec 'hf:{name}' needs the Hugging Face 'datasets' package: "
                              "pip install 'ssmdiff[hf]' (or pip install datasets)") from None
        try:
            local = os.path.expanduser(name)
            if any(os.path.exists(os.path.join(local, f)) for f in ("dataset_dict.json", "dataset_info.json")):
                ds = hfds.load_from_disk(local)  # a folder written by save_to_disk
                if isinstance(ds, hfds.DatasetDict):
                    if split not in ds:
                        raise ValueError(f"hf:{name} has splits {list(ds)}, not {split!r}; use hf:{name}:SPLIT")
                    ds = ds[split]
            else:
                ds = hfds.load_dataset(name, split=split)
        except ValueError:
            raise
        except Exception as e:  # network, unknown name, missing split: one message instead of a deep traceback
            raise ValueError(f"cannot load Hugging Face dataset {name!r} (split {split!r}): {e}") from None
        if len(ds) == 0:
            raise ValueError(f"hf:{name} split {split!r} is empty")
        feats = ds.features
        img_col = next((k for k, v in feats.items() if isinstance(v, hfds.Image)), None)
        if img_col is None:
            raise ValueError(f"hf:{name} has no image column (columns: {list(feats)})")
        lab_col = next((k for k, v in feats.items() if isinstance(v, hfds.ClassLabel)), None)
        self.ds, self.img_col, self.lab_col = ds, img_col, lab_col
        first = _as_pil(ds[0][img_col])
        if channels is None:
            channels = 1 if first.mode in _ONE_BAND else 3
        if image_size is None:
            if first.size[0] != first.size[1]:
                raise ValueError(f"hf:{name}: images are not square; pass image_size to centre-crop them")
            image_size = first.size[0]
        names = feats[lab_col].names if lab_col else None
        super().__init__(num_classes=len(names) if names else 0, channels=channels, image_size=image_size,
                         class_names=names, hflip=hflip, source=f"hf:{name}", split=split)

    def __len__(self):
        return len(self.ds)

    def _get(self, index):
        row = self.ds[index]
        img = resize_center_crop(_as_pil(row[self.img_col]).convert("RGB" if self.channels == 3 else "L"),
                                 self.image_size)
        arr = pil_to_uint8(img, self.channels)
        y = int(row[self.lab_col]) if self.lab_col else 0
        return uint8_to_float(torch.from_numpy(arr).permute(2, 0, 1)), y

    @property
    def labels(self):
        if self.lab_col is None:
            return np.zeros(len(self), dtype=np.int64)
        return np.asarray(self.ds[self.lab_col], dtype=np.int64)


# ----------------------------------------------------------------------------------------------- entry point


def build_dataset(spec: str, image_size: int | None = None, split: str = "train", hflip: bool = False,
                  channels: int | None = None, skip_bad: bool = False) -> ImageDataset:
    """Build a dataset from ``spec``.

    ``spec`` is "digits" (built-in), a folder of images (class sub-folders give labels), a CIFAR-10 python batch
    folder, an ``.npz`` file, a latent-shard folder written by :func:`ssmdiff.data.encode_latents`, or
    ``hf:NAME[:SPLIT]``. ``image_size`` resizes (shorter side) and centre-crops; ``hflip`` flips at random each
    time an item is read; ``channels`` forces 1 (grey) or 3 (RGB); ``skip_bad`` skips unreadable images (their
    number is ``dataset.num_skipped``) instead of raising.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    if image_size is not None and int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image_size = None if image_size is None else int(image_size)
    if spec == "digits":
        return load_digits_dataset(image_size=image_size, split=split, hflip=hflip, channels=channels)
    if spec.startswith("hf:"):
        rest = spec[3:]
        name, _, hsplit = rest.partition(":")
        return HFImageDataset(name, split=hsplit or split, image_size=image_size, hflip=hflip, channels=channels)
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {spec!r} not found: give 'digits', an image folder, a CIFAR-10 batch "
                                "folder, an .npz file, a latent-shard folder or hf:NAME")
    if os.path.isfile(path):
        if path.lower().endswith(".npz"):
            return load_npz_dataset(path, image_size=image_size, split=split, hflip=hflip, channels=channels)
        raise ValueError(f"{path}: a dataset file must be an .npz archive; for images give their folder")
    from .latents import LatentDataset, is_latent_folder

    if is_latent_folder(path):
        return LatentDataset(path, split=split, hflip=hflip, image_size=image_size, channels=channels)
    if is_cifar_folder(path):
        return load_cifar_dataset(path, image_size=image_size, split=split, hflip=hflip, channels=channels)
    return ImageFolderDataset(path, image_size=image_size, split=split, hflip=hflip, channels=channels,
                              skip_bad=skip_bad)


def dataset_tensor(dataset: Dataset, max_items: int | None = None, indices: Sequence[int] | None = None):
    """Stack a dataset (no flips) into (images float NCHW, labels long); ``max_items`` takes the first ones."""
    flip = getattr(dataset, "hflip", False)
    if flip:
        dataset.hflip = False
    try:
        if isinstance(dataset, TensorImageDataset) and indices is None:
            n = len(dataset) if max_items is None else min(max_items, len(dataset))
            x = dataset.data[:n]
            x = uint8_to_float(x) if x.dtype == torch.uint8 else x.float()
            return x, torch.from_numpy(dataset.labels[:n]).long()
        idx = list(indices) if indices is not None else range(len(dataset) if max_items is None
                                                              else min(max_items, len(dataset)))
        xs, ys = zip(*(dataset[i] for i in idx))
        return torch.stack(xs), torch.stack(ys)
    finally:
        if flip:
            dataset.hflip = True
