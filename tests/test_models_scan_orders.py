"""Scan orders and padding tokens of DiM (ssmdiff.models.scan_orders), checked against grids written out by hand."""

import pytest
import torch

from ssmdiff.models.scan_orders import (
    dim_layer_directions,
    inverse_permutation,
    pad_grid,
    padded_image_mask,
    scan_permutation,
    unpad_grid,
    zigzag_layer_orders,
)

ORDERS = ["h+", "v+", "v-", "zh+", "zv-", "zhm+", "zvm-"]


def test_column_major_by_hand():
    # 2 x 3 grid, row-major ids 0..5:  [[0 1 2], [3 4 5]] -> column-major 0 3 1 4 2 5
    assert scan_permutation(2, 3, "v+").tolist() == [0, 3, 1, 4, 2, 5]
    assert scan_permutation(2, 3, "h+") is None  # row-major is the storage order


def test_zigzag_by_hand():
    # [[0 1 2], [3 4 5], [6 7 8]]
    assert scan_permutation(3, 3, "zh+").tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    assert scan_permutation(3, 3, "zv+").tolist() == [0, 3, 6, 7, 4, 1, 2, 5, 8]
    assert scan_permutation(3, 3, "zhm+").tolist() == [2, 1, 0, 3, 4, 5, 8, 7, 6]
    assert scan_permutation(3, 3, "zvm+").tolist() == [6, 3, 0, 1, 4, 7, 8, 5, 2]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("hw", [(4, 4), (3, 5), (1, 6)])
def test_orders_are_permutations_with_exact_inverses(order, hw):
    h, w = hw
    perm = scan_permutation(h, w, order)
    if perm is None:
        return
    assert sorted(perm.tolist()) == list(range(h * w))
    inv = inverse_permutation(perm)
    x = torch.randn(2, h * w, 3)
    assert torch.equal(x[:, perm][:, inv], x)
    assert torch.equal(x[:, inv][:, perm], x)


@pytest.mark.parametrize("order", ["zh+", "zv+", "zhm+", "zvm+"])
def test_zigzag_paths_are_continuous(order):
    h, w = 4, 5
    perm = scan_permutation(h, w, order).tolist()
    for a, b in zip(perm, perm[1:]):
        ra, ca, rb, cb = a // w, a % w, b // w, b % w
        assert abs(ra - rb) + abs(ca - cb) == 1, (a, b)


def test_dim_direction_schedule():
    dirs = dim_layer_directions(9)
    assert dirs == ["h+", "h-", "v+", "v-", "h+", "v-", "v+", "h-", "h+"]
    # each out layer scans like the in layer whose skip it consumes (in i <-> out 2*half - i)
    half = 4
    for i in range(half):
        assert dirs[i] == dirs[2 * half - i]
    with pytest.raises(ValueError):
        dim_layer_directions(4)
    assert zigzag_layer_orders(10)[8] == zigzag_layer_orders(10)[0]


def test_padding_inserted_after_rows_and_below():
    h, w, k, d = 2, 3, 2, 1
    x = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, h * w, d)
    pad = torch.tensor([[-1.0], [-2.0]])
    out = pad_grid(x, pad, h, w).reshape(h + k, w + k)
    expected = torch.tensor(
        [[1, 2, 3, -1, -2],
         [4, 5, 6, -1, -2],
         [-1, -1, -1, -1, -1],
         [-2, -2, -2, -2, -2]], dtype=torch.float32)
    assert torch.equal(out, expected)
    # every column read top to bottom also ends with the pad tokens
    assert torch.equal(out[h:, :w], pad.expand(k, w))
    mask = padded_image_mask(h, w, k)
    assert torch.equal(out.reshape(-1)[mask], x.reshape(-1))
    assert (out.reshape(-1)[~mask] < 0).all()


def test_unpad_inverts_pad():
    x = torch.randn(3, 4 * 6, 5)
    pad = torch.randn(3, 5)
    padded = pad_grid(x, pad, 4, 6)
    assert padded.shape == (3, 7 * 9, 5)
    assert torch.equal(unpad_grid(padded, 4, 6, 3), x)
    with pytest.raises(ValueError):
        unpad_grid(padded, 4, 6, 2)
