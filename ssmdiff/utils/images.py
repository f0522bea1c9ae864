"""Image conversion and PNG writing: sample grids (with per-row class labels) and single images."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """Convert images in [-1, 1] (N, C, H, W) to uint8 (N, H, W, C); one channel stays one channel."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _pil(arr: np.ndarray) -> Image.Image:
    if arr.shape[-1] == 1:
        return Image.fromarray(arr[..., 0], mode="L")
    if arr.shape[-1] == 3:
        return Image.fromarray(arr, mode="RGB")
    if arr.shape[-1] == 4:
        return Image.fromarray(arr, mode="RGBA")
    raise ValueError(f"cannot write an image with {arr.shape[-1]} channels as PNG (1, 3 or 4 needed)")


def _atomic_save(img: Image.Image, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def make_grid(
    images: np.ndarray,
    nrow: int | None = None,
    row_labels: Sequence[str] | None = None,
    scale: int | None = None,
    pad: int = 2,
) -> Image.Image:
    """Tile uint8 NHWC images into one picture with ``nrow`` images per row.

    ``row_labels`` (one string per row) are written in a left margin; small images (e.g. 8x8 digits) are
    enlarged with nearest-neighbour ``scale`` (default: up to about 32 px) so that the grid is readable.
    """
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    if scale is None:
        scale = max(1, 32 // max(h, w))
    h2, w2 = h * scale, w * scale
    margin = 0
    if row_labels is not None:
        if len(row_labels) != rows:
            raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
        margin = 8 + 7 * max(len(s) for s in row_labels)
    mode = "RGB" if c in (1, 3) else "RGBA"
    canvas = Image.new(mode, (margin + nrow * (w2 + pad) + pad, rows * (h2 + pad) + pad), (255, 255, 255))
    for i in range(n):
        r, col = divmod(i, nrow)
        tile = _pil(images[i]).convert(mode)
        if scale != 1:
            tile = tile.resize((w2, h2), Image.NEAREST)
        canvas.paste(tile, (margin + pad + col * (w2 + pad), pad + r * (h2 + pad)))
    if row_labels is not None:
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(row_labels):
            draw.text((4, pad + r * (h2 + pad) + max(0, h2 // 2 - 6)), str(text), fill=(0, 0, 0))
    return canvas


def save_grid(
    images: np.ndarray,
    path: str,
    nrow: int | None = None,
    row_labels: Sequence[str] | None = None,
    scale: int | None = None,
) -> str:
    """Write :func:`make_grid` of uint8 NHWC ``images`` to ``path`` (PNG, atomically) and return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_save(make_grid(images, nrow=nrow, row_labels=row_labels, scale=scale), path)
    return path


def save_images(images: np.ndarray, folder: str, start: int = 0, labels: Sequence[int] | None = None) -> list[str]:
    """Write each uint8 NHWC image as ``{index:06d}[_class{k}].png`` in ``folder``; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, arr in enumerate(images):
        name = f"{start + i:06d}" + (f"_class{int(labels[i])}" if labels is not None else "") + ".png"
        path = os.path.join(folder, name)
        _pil(arr).save(path, format="PNG")
        paths.append(path)
    return paths


def class_grid_layout(labels: np.ndarray, class_names: Sequence[str] | None = None):
    """Order sample indices class by class so that each grid row holds one class.

    Returns (order, per_row, row_labels); rows are padded to the same length by repeating nothing: classes
    with fewer samples get a shorter row filled with blank tiles by the caller through ``-1`` entries.
    """
    classes = sorted(set(int(k) for k in labels))
    groups = [np.flatnonzero(labels == k) for k in classes]
    per_row = max(len(g) for g in groups)
    order = []
    for g in groups:
        order.extend(list(g) + [-1] * (per_row - len(g)))
    names = [(class_names[k] if class_names is not None else str(k)) for k in classes]
    return np.asarray(order), per_row, names


def save_class_grid(images: np.ndarray, labels: np.ndarray, path: str, class_names=None) -> str:
    """Grid with one row per class, each row labelled by its class (blank tiles pad short rows)."""
    order, per_row, names = class_grid_layout(np.asarray(labels), class_names)
    blank = np.full_like(images[:1], 255)
    tiles = np.concatenate([images[i : i + 1] if i >= 0 else blank for i in order], axis=0)
    return save_grid(tiles, path, nrow=per_row, row_labels=names)
