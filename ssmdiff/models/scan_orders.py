"""2-D scan orders over a token grid and the padding tokens that separate its lines.

A one-directional SSM reads a 2-D grid as a 1-D sequence. DiM alternates four orders across layers (row-major H+,
its reverse H-, column-major V+, its reverse V-) and pads the grid with k learnable tokens after every row and
below the last row, so that neither a row-major nor a column-major scan runs straight from the end of one line
into the start of the next. ZigMa-style "zigzag" orders are continuous (boustrophedon) paths instead.

Convention: a grid of h x w tokens is stored row-major, (N, h*w, D). An order is a permutation ``perm`` of
range(h*w) with ``seq = x[:, perm]``; ``inverse_permutation(perm)`` undoes it. Reversed orders are realised by
scanning the forward order with a reverse mixer (no flipped copies), so only H+, V+ and the zigzag bases are
permutations here.
"""

from __future__ import annotations

import torch

__all__ = [
    "DIM_DIRECTIONS",
    "dim_layer_directions",
    "zigzag_layer_orders",
    "scan_permutation",
    "inverse_permutation",
    "order_is_reverse",
    "pad_grid",
    "unpad_grid",
    "padded_image_mask",
]

DIM_DIRECTIONS = ("h+", "h-", "v+", "v-")


def dim_layer_directions(num_layers: int) -> list[str]:
    """DiM's direction per layer for a U-shaped stack of ``num_layers`` (= 2*half + 1) layers.

    The first half and the middle layer cycle H+ H- V+ V-; the second half mirrors the first, so the out layer
    that consumes a long skip scans in the same order as the in layer that produced it.
    """
    if num_layers < 1 or num_layers % 2 == 0:
        raise ValueError(f"a U-shaped stack has an odd number of layers, got {num_layers}")
    half = num_layers // 2
    first = [DIM_DIRECTIONS[i % 4] for i in range(half + 1)]
    return first + first[:half][::-1]


def zigzag_layer_orders(num_layers: int) -> list[str]:
    """ZigMa's eight continuous paths assigned to layers in turn: 4 bases x {forward, reverse}."""
    names = ["zh+", "zh-", "zv+", "zv-", "zhm+", "zhm-", "zvm+", "zvm-"]
    return [names[i % 8] for i in range(num_layers)]


def scan_permutation(h: int, w: int, order: str) -> torch.Tensor | None:
    """Permutation (long, h*w) that puts a row-major grid into the scan order's *forward* base.

    ``order`` is a direction name; its sign (+/-) is ignored here (the mixer's ``reverse`` flag handles it).
    Returns None for row-major orders (identity). Bases: "h" row-major, "v" column-major, "zh" snake over rows
    (even rows left-to-right, odd rows right-to-left), "zv" snake over columns, "zhm" the snake over rows started
    from the top-right corner, "zvm" the snake over columns started from the bottom-left corner.
    """
    base = order.rstrip("+-")
    idx = torch.arange(h * w).reshape(h, w)
    if base == "h":
        return None
    if base == "v":
        return idx.t().reshape(-1)
    if base in ("zh", "zhm"):
        g = idx.flip(1) if base == "zhm" else idx
        g = g.clone()
        g[1::2] = g[1::2].flip(1)
        return g.reshape(-1)
    if base in ("zv", "zvm"):
        g = (idx.flip(0) if base == "zvm" else idx).t().clone()
        g[1::2] = g[1::2].flip(1)
        return g.reshape(-1)
    raise ValueError(f"unknown scan order {order!r}")


def order_is_reverse(order: str) -> bool:
    """True for orders read from the last cell of their base path to the first ("h-", "v-", "zh-", ...)."""
    return order.endswith("-")


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv such that x[:, perm][:, inv] == x."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def pad_grid(x: torch.Tensor, pad: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Insert k pad tokens after every row and k pad rows below: (N, h*w, D) -> (N, (h+k)*(w+k), D).

    ``pad`` is (k, D): pad token j sits at offset j after each row end (and in pad row j); the corner block
    takes the same tokens column-wise, so every line of either orientation ends with pad tokens 0..k-1.
    """
    n, length, d = x.shape
    if length != h * w:
        raise ValueError(f"expected {h}x{w}={h * w} tokens, got {length}")
    k = pad.shape[0]
    grid = x.reshape(n, h, w, d)
    right = pad.to(x.dtype).reshape(1, 1, k, d).expand(n, h, k, d)
    grid = torch.cat([grid, right], dim=2)  # (n, h, w+k, d)
    bottom = pad.to(x.dtype).reshape(1, k, 1, d).expand(n, k, w + k, d)
    grid = torch.cat([grid, bottom], dim=1)  # (n, h+k, w+k, d)
    return grid.reshape(n, (h + k) * (w + k), d)


def unpad_grid(x: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """Remove what ``pad_grid`` inserted: (N, (h+k)*(w+k), D) -> (N, h*w, D)."""
    n, length, d = x.shape
    if length != (h + k) * (w + k):
        raise ValueError(f"expected {(h + k) * (w + k)} padded tokens, got {length}")
    return x.reshape(n, h + k, w + k, d)[:, :h, :w].reshape(n, h * w, d)


def padded_image_mask(h: int, w: int, k: int) -> torch.Tensor:
    """Boolean mask over the padded grid's (h+k)*(w+k) positions: True where an image token sits."""
    m = torch.zeros(h + k, w + k, dtype=torch.bool)
    m[:h, :w] = True
    return m.reshape(-1)
