"""Image preprocessing shared by every source: PIL resize + centre crop, uint8/float conversion, channel fixes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side equals ``size`` (bicubic, antialiased by PIL), then crop the centre square.

    Large reductions are first halved with a box filter, as ADM/DiT preprocessing does, so that aliasing from
    downsampling e.g. ImageNet photos to 32 px stays low.
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    new = (max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale)))
    img = img.resize(new, resample=Image.BICUBIC)
    left = (new[0] - size) // 2
    top = (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_uint8(img: Image.Image, channels: int) -> np.ndarray:
    """PIL image -> uint8 array (H, W, channels) with channels 1 (luminance) or 3 (RGB)."""
    if channels == 1:
        img = img.convert("L")
    elif channels == 3:
        img = img.convert("RGB")
    else:
        raise ValueError(f"images can be read with 1 or 3 channels, not {channels}")
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy follows
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (any layout) -> float32 in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def resize_float(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float NCHW (or CHW) images to ``size`` x ``size``: antialiased bilinear, so 8x8 <-> 16x16 keeps shapes."""
    squeeze = x.ndim == 3
    if squeeze:
        x = x[None]
    if x.shape[-2:] != (size, size):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"resize_float needs square images, got {tuple(x.shape[-2:])}")
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0] if squeeze else x


def convert_channels(x: np.ndarray, want: int | None, where: str) -> np.ndarray:
    """Convert a uint8/float NHWC array between 1 and 3 channels; anything else is a user error naming ``where``."""
    have = x.shape[-1]
    if have not in (1, 3):
        raise ValueError(
            f"{where}: images have {have} channels; ssmdiff reads 1-channel (grey) or 3-channel (RGB) images. "
            "Convert the data to grey or RGB first."
        )
    if want is None or want == have:
        return x
    if want == 3 and have == 1:
        return np.repeat(x, 3, axis=-1)
    if want == 1 and have == 3:
        # ITU-R 601 luma, the same weights PIL uses for convert("L").
        y = x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114
        return (np.round(y).astype(np.uint8) if x.dtype == np.uint8 else y.astype(x.dtype))
    raise ValueError(f"{where}: cannot convert {have}-channel images to {want} channels (use channels=1 or 3)")
