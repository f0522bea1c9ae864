import itertools
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from ssmdiff import evaluate as E
from ssmdiff.data import build_dataset, dataset_tensor


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One classifier cache for this module (trained once, ~10 s on 2 cores)."""
    d = str(tmp_path_factory.mktemp("ssmdiff_cache"))
    old = os.environ.get("SSMDIFF_CACHE")
    os.environ["SSMDIFF_CACHE"] = d
    E._CLASSIFIER_MEMO.clear()
    yield d
    E._CLASSIFIER_MEMO.clear()
    if old is None:
        os.environ.pop("SSMDIFF_CACHE", None)
    else:
        os.environ["SSMDIFF_CACHE"] = old


# ------------------------------------------------------------------------------------------- classifier


def test_classifier_heldout_accuracy_and_cache(cache):
    clf = E.get_digit_classifier()
    path = os.path.join(cache, f"digit_classifier_v{E.CLASSIFIER_VERSION}.safetensors")
    assert os.path.exists(path)
    xt, yt = dataset_tensor(build_dataset("digits", split="test"))
    with torch.no_grad():
        acc = (clf(xt).argmax(1) == yt).float().mean().item()
    assert acc >= 0.97
    # Also at 16x16 (the trainer may train there): resized back to 8x8 with antialiasing inside the classifier.
    x16, y16 = dataset_tensor(build_dataset("digits", split="test", image_size=16))
    with torch.no_grad():
        assert (clf(x16).argmax(1) == y16).float().mean().item() >= 0.97
    # Loaded from the file, not retrained, on the next use.
    E._CLASSIFIER_MEMO.clear()
    again = E.get_digit_classifier()
    for a, b in zip(clf.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupt_cache_is_rebuilt(cache, monkeypatch):
    path = os.path.join(cache, f"digit_classifier_v{E.CLASSIFIER_VERSION}.safetensors")
    E.get_digit_classifier()
    with open(path, "rb") as f:
        good = f.read()
    real_train = E.train_digit_classifier
    calls = []
    monkeypatch.setattr(E, "train_digit_classifier", lambda: calls.append(1) or real_train(epochs=1))
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    E._CLASSIFIER_MEMO.clear()
    clf = E.get_digit_classifier()
    assert calls == [1] and isinstance(clf, E.DigitClassifier)
    from safetensors.torch import load_file

    assert set(load_file(path)) == set(clf.state_dict())
    # Put the properly trained classifier back for the other tests.
    with open(path, "wb") as f:
        f.write(good)
    E._CLASSIFIER_MEMO.clear()


# ------------------------------------------------------------------------------------------- formulas


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    expect = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert E.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    # General covariances: against tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's matrix square root.
    q1, q2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = q1 @ q1.T + 0.1 * np.eye(6), q2 @ q2.T + 0.1 * np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert E.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)
    assert E.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-8)
    # Singular covariances (fewer samples than dimensions) stay finite and non-negative.
    fa, fb = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    assert 0 < E.frechet_distance_features(fa, fb) < np.inf


def test_frechet_matches_torchmetrics():
    FrechetInceptionDistance = pytest.importorskip("torchmetrics.image.fid").FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    rng = np.random.default_rng(1)
    fa, fb = rng.normal(size=(300, 8)), rng.normal(0.3, 1.2, size=(250, 8))
    fid = FrechetInceptionDistance(feature=Identity(), normalize=True)
    fid.update(torch.from_numpy(fa), real=True)
    fid.update(torch.from_numpy(fb), real=False)
    assert E.frechet_distance_features(fa, fb) == pytest.approx(fid.compute().item(), rel=1e-6)


def _mmd2_direct(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_unbiased_estimator():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 4)), rng.normal(0.5, 1, size=(15, 4))
    assert E.mmd2_unbiased(x, y) == pytest.approx(_mmd2_direct(x, y), rel=1e-10)
    # One subset holding every point is the full-set estimator (the order of points does not matter).
    m, s = E.kernel_distance(x, y[:12], subsets=1, subset_size=12)
    assert m == pytest.approx(_mmd2_direct(x, y[:12]), rel=1e-10) and s == 0
    # Subsets through the precomputed kernels equal recomputing the estimator per subset.
    big_x, big_y = rng.normal(size=(40, 4)), rng.normal(size=(50, 4))
    m, _ = E.kernel_distance(big_x, big_y, subsets=5, subset_size=10, seed=3)
    r = np.random.default_rng(3)
    vals = [E.mmd2_unbiased(big_x[r.choice(40, 10, replace=False)], big_y[r.choice(50, 10, replace=False)])
            for _ in range(5)]
    assert m == pytest.approx(np.mean(vals), rel=1e-10)


def test_kid_matches_torchmetrics():
    KernelInceptionDistance = pytest.importorskip("torchmetrics.image.kid").KernelInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return x

    rng = np.random.default_rng(4)
    fa, fb = rng.normal(size=(30, 6)), rng.normal(0.2, 1, size=(30, 6))
    kid = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=30, normalize=True)
    kid.update(torch.from_numpy(fa), real=True)
    kid.update(torch.from_numpy(fb), real=False)
    assert E.kernel_distance(fa, fb, subsets=1, subset_size=30)[0] == pytest.approx(kid.compute()[0].item(),
                                                                                     rel=1e-6)


def test_precision_recall_known_sets():
    real = np.arange(10, dtype=float)[:, None]  # k=1 radius of every real point: 1
    fake = np.array([[0.5], [1.5], [50.0], [51.0]])  # k=1 radii: 1, 1, 1, 1
    p, r = E.precision_recall(real, fake, k=1)
    assert p == pytest.approx(0.5)  # 0.5 and 1.5 lie inside real balls; 50 and 51 do not
    assert r == pytest.approx(0.3)  # real 0, 1, 2 lie in [-0.5, 2.5]; nothing lies near 50
    same = np.random.default_rng(0).normal(size=(30, 3))
    assert E.precision_recall(same, same, k=3) == (1.0, 1.0)
    far = same + 100
    assert E.precision_recall(same, far, k=3) == (0.0, 0.0)
    # A collapsed generator (all samples at one real point): perfect precision, recall of a single ball.
    collapsed = np.repeat(real[4:5], 5, axis=0)
    p, r = E.precision_recall(real, collapsed, k=1)
    assert p == 1.0 and r == pytest.approx(0.1)


def test_inception_score_formula():
    onehot = np.eye(10)[np.arange(100) % 10]
    assert E.inception_score(onehot, splits=1)[0] == pytest.approx(10, rel=1e-6)
    assert E.inception_score(np.full((50, 10), 0.1), splits=5)[0] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- evaluate_samples


def test_evaluate_real_digits_vs_noise(cache):
    x, y = dataset_tensor(build_dataset("digits", split="train"))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:300]
    good = E.evaluate_samples(x[idx], y[idx], kid_subsets=10)
    assert good["feature_space"] == "digit-classifier" and good["reference"] == "digits:test"
    assert good["accuracy"] >= 0.97 and set(good["per_class_accuracy"]) == {str(k) for k in range(10)}
    assert good["reference_accuracy"] >= 0.97
    assert good["fd"] < 3 * good["floor_fd"] + 1 and good["precision"] > 0.7 and good["recall"] > 0.6
    noise = E.evaluate_samples(torch.rand(300, 1, 8, 8) * 2 - 1, torch.arange(300) % 10, kid_subsets=10)
    assert noise["accuracy"] < 0.4
    assert noise["fd"] > 10 * good["fd"] and noise["kid_mean"] > 10 * max(good["kid_mean"], 1e-3)
    assert noise["recall"] < 0.2
    assert noise["floor_num_samples"] == 300
    json.dumps(good), json.dumps(noise)  # what the CLI writes
    # Real digits at 16x16 (what a model trained at 16x16 should produce) score like the real-vs-real floor:
    # the reference and floor are built at the samples' resolution.
    x16, y16 = dataset_tensor(build_dataset("digits", split="train", image_size=16))
    at16 = E.evaluate_samples(x16[idx], y16[idx], metrics=["accuracy", "fd", "pr"])
    assert at16["accuracy"] >= 0.97 and at16["fd"] < 1.5 * at16["floor_fd"] + 0.5
    assert at16["recall"] > at16["floor_recall"] - 0.1


def test_evaluate_reads_png_folder_and_npz(cache, tmp_path):
    from ssmdiff.utils.images import save_images, to_uint8_nhwc

    x, y = dataset_tensor(build_dataset("digits", split="test", image_size=16))
    u8 = to_uint8_nhwc(x[:60])
    save_images(u8, str(tmp_path / "pngs"), labels=y[:60].tolist())
    imgs, labels = E.load_image_batch(str(tmp_path / "pngs"))
    assert imgs.shape == (60, 1, 16, 16) and torch.equal(labels, y[:60])
    assert torch.allclose(imgs, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1)
    r1 = E.evaluate_samples(str(tmp_path / "pngs"), metrics=["accuracy", "fd"], floor=False)
    assert r1["accuracy"] >= 0.9 and "kid_mean" not in r1 and "floor_fd" not in r1
    np.savez(tmp_path / "s.npz", arr_0=u8, labels=y[:60].numpy())
    r2 = E.evaluate_samples(str(tmp_path / "s.npz"), metrics=["accuracy", "fd"], floor=False)
    assert r2["accuracy"] == r1["accuracy"] and r2["fd"] == pytest.approx(r1["fd"])
    # A reference given as an .npz instead of the built-in split.
    r3 = E.evaluate_samples(u8, reference=str(tmp_path / "s.npz"), feature="digits", metrics=["fd"])
    assert r3["fd"] == pytest.approx(0, abs=1e-3) and r3["num_reference"] == 60


def test_evaluate_errors(tmp_path):
    x = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match="inception_weights|allow_download"):
        E.evaluate_samples(x, reference=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights"):
        E.evaluate_samples(x, reference=str(tmp_path), inception_weights=str(tmp_path / "missing.pth"))
    try:
        import torch_fidelity  # noqa: F401

        fidelity = True
    except ImportError:
        fidelity = False
    if not fidelity:
        with pytest.raises(ImportError, match="torch-fidelity"):
            E.evaluate_samples(x, reference=str(tmp_path), allow_download=True)
    with pytest.raises(ValueError, match="unknown metric"):
        E.evaluate_samples(x, metrics=["bogus"])
    with pytest.raises(ValueError, match="labels"):
        E.evaluate_samples(x, labels=[1, 2])
    with pytest.raises(FileNotFoundError):
        E.evaluate_samples(str(tmp_path / "none"))
    (tmp_path / "mixed").mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match="same size"):
        E.load_image_batch(str(tmp_path / "mixed"))
