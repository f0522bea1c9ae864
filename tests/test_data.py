import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ssmdiff.data import LatentDataset, build_dataset, dataset_tensor, decode_latents, encode_latents, load_vae


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------------------------------ digits


def test_digits_splits_and_range():
    from sklearn.datasets import load_digits

    tr = build_dataset("digits")
    te = build_dataset("digits", split="test")
    assert (len(tr), len(te)) == (1437, 360)
    assert (tr.num_classes, tr.channels, tr.image_size) == (10, 1, 8)
    assert tr.class_names == [str(i) for i in range(10)]
    x, y = tr[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    # Values 0..16 map linearly to [-1, 1]: each image must be a raw sklearn image / 8 - 1.
    raw = load_digits()
    xs, ys = dataset_tensor(tr)
    xt, yt = dataset_tensor(te)
    allx = torch.cat([xs, xt])[:, 0].numpy()
    assert np.allclose(allx * 8 + 8, np.round(allx * 8 + 8))
    assert allx.min() >= -1 and allx.max() <= 1
    # Together the splits are exactly the 1797 sklearn images (as a multiset of (image, label)).
    key = lambda im, lab: (int(lab), tuple(np.round(im * 8 + 8).astype(int).ravel()))  # noqa: E731
    ours = sorted(key(a, b) for a, b in zip(allx, torch.cat([ys, yt]).numpy()))
    theirs = sorted(key(a / 8 - 1, b) for a, b in zip(raw.images, raw.target))
    assert ours == theirs
    # Stratified held-out split, fixed across calls.
    assert np.bincount(te.labels).min() >= 35
    assert torch.equal(dataset_tensor(build_dataset("digits", split="test"))[0], xt)


def test_digits_resize_and_channels():
    ds = build_dataset("digits", image_size=16, channels=3)
    x, _ = ds[3]
    assert x.shape == (3, 16, 16) and ds.image_size == 16 and ds.channels == 3
    assert x.min() >= -1 and x.max() <= 1
    # Averaging 2x2 blocks of the upsampled image gives back roughly the 8x8 one.
    x8 = build_dataset("digits")[3][0]
    back = torch.nn.functional.avg_pool2d(x[:1][None], 2)[0]
    assert (back - x8).abs().mean() < 0.15
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", split="bogus")


def test_hflip_is_random_and_exact():
    ds = build_dataset("digits", hflip=True)
    plain = build_dataset("digits")
    x0 = plain[5][0]
    seen = set()
    for _ in range(40):
        x = ds[5][0]
        if torch.equal(x, x0):
            seen.add("same")
        elif torch.equal(x, x0.flip(-1)):
            seen.add("flipped")
        else:
            raise AssertionError("flip produced something other than the image or its mirror")
    assert seen == {"same", "flipped"}
    assert all(torch.equal(plain[5][0], x0) for _ in range(10))


# ------------------------------------------------------------------------------------------------ folders


def test_image_folder_classes_values_and_crop(tmp_path):
    root = tmp_path / "imgs"
    for k, name in enumerate(["cat", "dog"]):
        for i in range(3):
            arr = np.zeros((8, 8, 3), np.uint8)
            arr[..., k] = 255
            arr[0, 0] = (10 * i, 0, 0)
            _png(str(root / name / f"{i}.png"), arr)
    ds = build_dataset(str(root))
    assert (len(ds), ds.num_classes, ds.class_names, ds.channels, ds.image_size) == (6, 2, ["cat", "dog"], 3, 8)
    x, y = ds[4]
    assert int(y) == 1
    assert torch.allclose(x[1, 1:, 1:], torch.ones(7, 7)) and torch.allclose(x[0, 1:, 1:], -torch.ones(7, 7))
    assert torch.isclose(x[0, 0, 0], torch.tensor(10 / 127.5 - 1))

    # Resize the shorter side and crop the centre: a 16x8 picture red|green|blue (4|8|4 columns) -> all green.
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :4, 0] = 255
    wide[:, 4:12, 1] = 255
    wide[:, 12:, 2] = 255
    _png(str(tmp_path / "wide" / "a.png"), wide)
    w = build_dataset(str(tmp_path / "wide"), image_size=8)
    xw, yw = w[0]
    assert w.num_classes == 0 and int(yw) == 0 and xw.shape == (3, 8, 8)
    assert torch.allclose(xw[1], torch.ones(8, 8), atol=0.02) and xw[0].max() < -0.9 and xw[2].max() < -0.9
    small = build_dataset(str(tmp_path / "wide"), image_size=4)
    assert small[0][0].shape == (3, 4, 4)


def test_image_folder_grey_and_forced_channels(tmp_path):
    for i in range(2):
        _png(str(tmp_path / "g" / f"{i}.png"), np.full((6, 6), 200, np.uint8))
    ds = build_dataset(str(tmp_path / "g"))
    assert ds.channels == 1 and ds[0][0].shape == (1, 6, 6)
    rgb = build_dataset(str(tmp_path / "g"), channels=3)
    assert rgb[0][0].shape == (3, 6, 6)
    with pytest.raises(ValueError, match="channels"):
        build_dataset(str(tmp_path / "g"), channels=2)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_dataset(str(tmp_path / "empty"))

    bad = tmp_path / "bad"
    for i in range(3):
        _png(str(bad / f"{i}.png"), np.zeros((4, 4, 3), np.uint8))
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (bad / "0.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="broken.png"):
        build_dataset(str(bad))
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = build_dataset(str(bad), skip_bad=True)
    assert len(ds) == 3 and ds.num_skipped == 2
    assert sorted(os.path.basename(f) for f in ds.skipped_files) == ["broken.png", "truncated.png"]

    mixed = tmp_path / "mixed"
    _png(str(mixed / "a.png"), np.zeros((4, 4, 3), np.uint8))
    _png(str(mixed / "b.png"), np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="image_size"):
        build_dataset(str(mixed))
    assert build_dataset(str(mixed), image_size=4)[1][0].shape == (3, 4, 4)


# ------------------------------------------------------------------------------------------------ npz


def test_npz_uint8_nhwc_and_float_nchw(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=imgs, labels=np.array([0, 1, 2, 1, 0]))
    ds = build_dataset(str(tmp_path / "a.npz"))
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (5, 3, 4, 3)
    x, y = ds[2]
    assert int(y) == 2
    assert torch.allclose(x, torch.from_numpy(imgs[2]).permute(2, 0, 1).float() / 127.5 - 1)

    f = rng.uniform(-1, 1, (3, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=f)
    fd = build_dataset(str(tmp_path / "f.npz"))
    assert fd.num_classes == 0 and fd.channels == 1 and torch.allclose(fd[1][0], torch.from_numpy(f[1]))
    assert build_dataset(str(tmp_path / "f.npz"), image_size=8)[0][0].shape == (1, 8, 8)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "k.npz", pictures=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="k.npz.*arr_0"):
        build_dataset(str(tmp_path / "k.npz"))
    np.savez(tmp_path / "c.npz", arr_0=np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="c.npz.*2 channels"):
        build_dataset(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "r.npz", images=np.full((2, 3, 4, 4), 5.0, np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        build_dataset(str(tmp_path / "r.npz"))
    (tmp_path / "z.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="z.npz"):
        build_dataset(str(tmp_path / "z.npz"))


# ------------------------------------------------------------------------------------------------ CIFAR


def _cifar_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": list(labels), b"data": data, b"filenames": []}, f, protocol=2)


def test_cifar_batches(tmp_path):
    rng = np.random.default_rng(1)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        batches.append(data)
        _cifar_batch(tmp_path / f"data_batch_{i}", data, [i % 10] * 4)
    _cifar_batch(tmp_path / "test_batch", rng.integers(0, 256, (3, 3072), dtype=np.uint8), [9, 8, 7])
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    ds = build_dataset(str(tmp_path))
    assert (len(ds), ds.num_classes, ds.channels, ds.image_size) == (20, 10, 3, 32)
    assert ds.class_names[9] == "truck"
    x, y = ds[5]  # second image of data_batch_2
    assert int(y) == 2
    row = batches[1][1]
    # CIFAR rows are the R plane, then G, then B, each row-major 32x32.
    assert torch.allclose(x, torch.from_numpy(row.reshape(3, 32, 32)).float() / 127.5 - 1)
    te = build_dataset(str(tmp_path), split="test", image_size=16, hflip=True)
    assert len(te) == 3 and te[0][0].shape == (3, 16, 16) and te.labels.tolist() == [9, 8, 7]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    target = str(tmp_path / "pwned")
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(target), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        build_dataset(str(tmp_path), split="test")
    assert not os.path.exists(target)


def test_cifar_missing_batches(tmp_path):
    _cifar_batch(tmp_path / "data_batch_1", np.zeros((1, 3072), np.uint8), [0])
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        build_dataset(str(tmp_path))


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install"):
        build_dataset("hf:cifar10")


def test_hf_dataset_saved_to_disk(tmp_path):
    hfds = pytest.importorskip("datasets")
    imgs = [np.full((6, 6, 3), 40 * i, np.uint8) for i in range(4)]
    feats = hfds.Features({"image": hfds.Image(), "label": hfds.ClassLabel(names=["a", "b"])})
    d = hfds.Dataset.from_dict({"image": [Image.fromarray(a) for a in imgs], "label": [0, 1, 1, 0]}, features=feats)
    hfds.DatasetDict({"train": d, "test": d.select([0, 1])}).save_to_disk(str(tmp_path / "hf"))
    ds = build_dataset(f"hf:{tmp_path / 'hf'}", hflip=True)
    assert (len(ds), ds.num_classes, ds.class_names, ds.channels, ds.image_size) == (4, 2, ["a", "b"], 3, 6)
    x, y = ds[2]
    assert int(y) == 1 and torch.allclose(x, torch.full((3, 6, 6), 80 / 127.5 - 1))
    te = build_dataset(f"hf:{tmp_path / 'hf'}:test", image_size=4)
    assert len(te) == 2 and te[0][0].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="splits"):
        build_dataset(f"hf:{tmp_path / 'hf'}:nope")


def test_bad_specs(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=".npz"):
        build_dataset(str(tmp_path / "x.txt"))
    with pytest.raises(ValueError):
        build_dataset("")


# ------------------------------------------------------------------------------------------------ latents


@pytest.fixture
def tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=0.5)
    path = tmp_path / "vae"
    vae.save_pretrained(str(path))
    return str(path)


def test_encode_read_decode_latents(tmp_path, tiny_vae):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    np.savez(tmp_path / "d.npz", arr_0=imgs, labels=labels)
    ds = build_dataset(str(tmp_path / "d.npz"))
    vae = load_vae(tiny_vae)
    out = tmp_path / "lat"
    m = encode_latents(ds, vae, str(out), batch_size=2, shard_size=3, progress=False, flip_copies=True,
                       vae_name=tiny_vae)
    assert m["scaling_factor"] == 0.5 and m["posterior"] == "mean" and m["latent_shape"] == [4, 4, 4]
    assert [s["count"] for s in m["shards"]] == [4, 3] and m["labels"] == labels.tolist()
    assert json.loads((out / "manifest.json").read_text())["num_items"] == 7

    lat = build_dataset(str(out))
    assert isinstance(lat, LatentDataset)
    assert (len(lat), lat.channels, lat.image_size, lat.num_classes) == (7, 4, 4, 3)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * 0.5
        ref_flip = vae.encode(x.flip(-1)).latent_dist.mean * 0.5
    z, y = lat[5]
    assert int(y) == 2 and torch.allclose(z, ref[5], atol=1e-5)
    flipped = build_dataset(str(out), hflip=True)
    outs = [flipped[1][0] for _ in range(30)]
    assert any(torch.allclose(o, ref_flip[1], atol=1e-5) for o in outs)
    assert all(torch.allclose(o, ref_flip[1], atol=1e-5) or torch.allclose(o, ref[1], atol=1e-5) for o in outs)

    dec = decode_latents(ref[:2], vae)
    with torch.no_grad():
        direct = vae.decode(ref[:2] / 0.5).sample.clamp(-1, 1)
    assert dec.shape == (2, 3, 8, 8) and torch.allclose(dec, direct, atol=1e-5)

    sampled = encode_latents(ds, vae, str(tmp_path / "lat2"), sample_posterior=True, seed=3, progress=False)
    assert sampled["posterior"] == "sample" and sampled["seed"] == 3


def test_latent_errors(tmp_path, tiny_vae):
    vae = load_vae(tiny_vae)
    grey = build_dataset("digits", split="test")
    with pytest.raises(ValueError, match="3-channel"):
        encode_latents(grey, vae, str(tmp_path / "o"), progress=False)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "shard_00000.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="extract-latents"):
        build_dataset(str(tmp_path / "partial"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path / "novae"))
