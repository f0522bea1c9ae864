"""VAE latents: encode a dataset once into safetensors shards + a JSON manifest, read them back, decode samples.

Shards hold latents already multiplied by the VAE's scaling factor (after subtracting its shift factor, for VAEs
that have one), i.e. what the diffusion model trains on; :func:`decode_latents` undoes both before decoding.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from .datasets import ImageDataset

MANIFEST = "manifest.json"
FORMAT = "ssmdiff-latents"


def load_vae(name_or_path: str, subfolder: str | None = None, device="cpu", dtype=torch.float32):
    """Load a diffusers ``AutoencoderKL`` from a local folder or a Hugging Face hub id (e.g. stabilityai/sd-vae-ft-ema).

    ``name_or_path`` may end in ``:SUBFOLDER`` (e.g. ``stabilityai/stable-diffusion-2-1:vae``). Downloading only
    happens when the user names a hub id that is not in the local cache.
    """
    from diffusers import AutoencoderKL

    if subfolder is None and ":" in name_or_path and not os.path.exists(name_or_path):
        name_or_path, subfolder = name_or_path.rsplit(":", 1)
    looks_local = name_or_path.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name_or_path))
    if looks_local:
        path = os.path.expanduser(name_or_path)
        cfg = os.path.join(path, subfolder or "", "config.json")
        if not os.path.exists(cfg):
            raise FileNotFoundError(f"no VAE at {os.path.join(path, subfolder or '')} (missing config.json). Give a "
                                    "folder saved with AutoencoderKL.save_pretrained, or a hub id.")
        name_or_path = path
    try:
        kw = {"subfolder": subfolder} if subfolder else {}
        vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load an AutoencoderKL from {name_or_path!r}: {e}") from None
    return vae.to(device).eval().requires_grad_(False)


def _vae_factors(vae) -> tuple[float, float]:
    sf = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    return float(sf if sf is not None else 1.0), float(shift if shift is not None else 0.0)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def encode_latents(dataset, vae, out_dir: str, batch_size: int = 32, shard_size: int = 10000, device="cpu",
                   sample_posterior: bool = False, flip_copies: bool = False, seed: int = 0, vae_name: str = "",
                   progress: bool = True) -> dict:
    """Encode every image of ``dataset`` with ``vae`` and write ``shard_XXXXX.safetensors`` + ``manifest.json``.

    Latents are the posterior mean (default) or, with ``sample_posterior``, one sample drawn with ``seed``; the
    manifest records which, plus the scaling/shift factors, latent shape, labels, class names and the source.
    ``flip_copies`` also stores the latents of horizontally flipped images, so that :class:`LatentDataset` can
    flip exactly (flipping a latent is only an approximation of encoding the flipped image). The manifest is
    written last, so an interrupted extraction is never mistaken for a complete one. Returns the manifest.
    """
    from safetensors.torch import save

    if len(dataset) == 0:
        raise ValueError("the dataset to encode is empty")
    vae_in = int(getattr(vae.config, "in_channels", 3))
    ch = getattr(dataset, "channels", None)
    if ch is not None and ch != vae_in:
        raise ValueError(f"the VAE expects {vae_in}-channel images but the dataset has {ch}; rebuild the dataset "
                         f"with channels={vae_in}")
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    size = getattr(dataset, "image_size", None)
    if size is not None and size % down:
        raise ValueError(f"image size {size} is not divisible by the VAE's downsampling factor {down}")
    sf, shift = _vae_factors(vae)
    os.makedirs(out_dir, exist_ok=True)
    old = os.path.join(out_dir, MANIFEST)
    if os.path.exists(old):
        os.remove(old)  # the folder is about to change; never leave a manifest describing other shards
    was_flip = getattr(dataset, "hflip", False)
    if was_flip:
        dataset.hflip = False
    vae = vae.to(device)
    dtype = next(vae.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    n = len(dataset)
    shards, labels_all = [], []
    buf_z, buf_zf, buf_y = [], [], []
    shape = None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="encode", unit="img", disable=not progress)

        def encode(x):
            dist = vae.encode(x.to(device, dtype)).latent_dist
            z = dist.sample(generator=gen) if sample_posterior else dist.mean
            return ((z.float() - shift) * sf).cpu()

        def flush():
            if not buf_z:
                return
            tensors = {"latents": torch.cat(buf_z).contiguous(), "labels": torch.cat(buf_y).contiguous()}
            if flip_copies:
                tensors["latents_flipped"] = torch.cat(buf_zf).contiguous()
            name = f"shard_{len(shards):05d}.safetensors"
            _atomic_write_bytes(os.path.join(out_dir, name), save(tensors))
            shards.append({"file": name, "count": int(tensors["labels"].shape[0])})
            buf_z.clear(), buf_zf.clear(), buf_y.clear()

        pending = 0
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            x = torch.stack([a for a, _ in items])
            y = torch.stack([b for _, b in items]).long()
            z = encode(x)
            shape = list(z.shape[1:])
            buf_z.append(z)
            buf_y.append(y)
            if flip_copies:
                buf_zf.append(encode(x.flip(-1)))
            labels_all += y.tolist()
            pending += len(y)
            bar.update(len(y))
            if pending >= shard_size:
                flush()
                pending = 0
        flush()
        bar.close()
    finally:
        if was_flip:
            dataset.hflip = True
    describe = dataset.describe() if hasattr(dataset, "describe") else {"source": type(dataset).__name__}
    manifest = {
        "format": FORMAT, "version": 1, "vae": vae_name or getattr(vae.config, "_name_or_path", ""),
        "scaling_factor": sf, "shift_factor": shift, "posterior": "sample" if sample_posterior else "mean",
        "seed": seed if sample_posterior else None, "latent_shape": shape, "num_items": n,
        "image_size": size, "image_channels": ch, "num_classes": int(getattr(dataset, "num_classes", 0)),
        "class_names": getattr(dataset, "class_names", None), "flip_copies": bool(flip_copies),
        "source": describe, "shards": shards, "labels": labels_all,
    }
    _atomic_write_bytes(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def is_latent_folder(path: str) -> bool:
    """True when ``path`` holds a latent manifest (or shards without one, which :class:`LatentDataset` reports)."""
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, MANIFEST)):
        return True
    return any(f.startswith("shard_") and f.endswith(".safetensors") for f in os.listdir(path))


class LatentDataset(ImageDataset):
    """Latent shards written by :func:`encode_latents`; items are (scaled latent CHW, label).

    ``hflip`` picks the stored flipped encoding half of the time when the shards have one; otherwise it flips
    the latent tensor itself (with a one-time warning, as that only approximates the flipped image's encoding).
    ``scaling_factor``, ``shift_factor`` and ``vae`` (the VAE name) come from the manifest.
    """

    def __init__(self, folder: str, split="train", hflip=False, image_size=None, channels=None):
        from safetensors.torch import load_file

        mpath = os.path.join(folder, MANIFEST)
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"{folder}: no {MANIFEST}; the latent extraction did not finish. Run "
                                    "`ssmdiff extract-latents` again for this folder.")
        try:
            with open(mpath) as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{mpath} is not a readable latent manifest: {e}") from None
        if m.get("format") != FORMAT:
            raise ValueError(f"{mpath} is not an ssmdiff latent manifest")
        zs, zfs, ys = [], [], []
        for sh in m["shards"]:
            p = os.path.join(folder, sh["file"])
            try:
                t = load_file(p)
            except Exception as e:
                raise ValueError(f"cannot read latent shard {p}: {e}. Re-run `ssmdiff extract-latents`.") from None
            if t["latents"].shape[0] != sh["count"]:
                raise ValueError(f"{p}: holds {t['latents'].shape[0]} latents, manifest says {sh['count']}")
            zs.append(t["latents"])
            ys.append(t["labels"])
            if "latents_flipped" in t:
                zfs.append(t["latents_flipped"])
        self.latents = torch.cat(zs).float()
        self.latents_flipped = torch.cat(zfs).float() if len(zfs) == len(zs) and zfs else None
        self._labels = torch.cat(ys).long().numpy()
        c, h, w = self.latents.shape[1:]
        if image_size is not None and image_size != h:
            raise ValueError(f"{folder}: latents are {h}x{w}; image_size={image_size} does not match (latents cannot "
                             "be resized; extract them again at the wanted resolution)")
        if channels is not None and channels != c:
            raise ValueError(f"{folder}: latents have {c} channels, not {channels}")
        self.scaling_factor = float(m["scaling_factor"])
        self.shift_factor = float(m.get("shift_factor") or 0.0)
        self.vae = m.get("vae", "")
        self.posterior = m.get("posterior")
        self.manifest = m
        self._warned = False
        super().__init__(num_classes=m.get("num_classes", 0), channels=c, image_size=h,
                         class_names=m.get("class_names"), hflip=hflip, source=os.path.abspath(folder), split=split)

    def __len__(self):
        return self.latents.shape[0]

    def __getitem__(self, index):
        index = int(index)
        y = torch.tensor(int(self._labels[index]), dtype=torch.long)
        if self.hflip and torch.rand(()) < 0.5:
            if self.latents_flipped is not None:
                return self.latents_flipped[index], y
            if not self._warned:
                warnings.warn("latent shards have no flipped copies (extract with flip copies for exact flips); "
                              "flipping the latents themselves")
                self._warned = True
            return self.latents[index].flip(-1), y
        return self.latents[index], y

    @property
    def labels(self):
        return self._labels

    def describe(self):
        d = super().describe()
        d.update(latent=True, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor, vae=self.vae)
        return d


@torch.no_grad()
def decode_latents(z: torch.Tensor, vae, scaling_factor: float | None = None, shift_factor: float | None = None,
                   batch_size: int = 32) -> torch.Tensor:
    """Decode scaled latents (as stored in shards / produced by a latent model) to images in [-1, 1] (float CPU).

    The factors default to the VAE config's, which is what :func:`encode_latents` used.
    """
    sf, shift = _vae_factors(vae)
    sf = sf if scaling_factor is None else float(scaling_factor)
    shift = shift if shift_factor is None else float(shift_factor)
    p = next(vae.parameters())
    out = []
    for i in range(0, z.shape[0], batch_size):
        zi = z[i:i + batch_size].to(p.device, torch.float32) / sf + shift
        out.append(vae.decode(zi.to(p.dtype)).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.empty(0)
