"""Weak-to-strong fine-tuning (``ssmdiff train --init-from RUN --image-size N``) and when training evaluates."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssmdiff import checkpoint as ckpt
from ssmdiff.cli import main
from ssmdiff.models import create_model
from ssmdiff.models.layers import sincos_pos_embed_2d
from ssmdiff.train import (TrainConfig, eval_reference_for, eval_skip_reason, inherit_init_settings,
                           init_model_from)

COMMON = ["--batch-size", "8", "--warmup-steps", "1", "--log-every", "1", "--samples-per-class", "0",
          "--sample-steps", "2", "--no-evaluate", "--no-progress", "--drop-path", "0.0", "--ckpt-every", "100"]
ARCHS = {
    "DiS-T/2": {"hidden_size": 32, "depth": 2, "d_state": 8},
    "DiM-T/2": {"hidden_size": 32, "depth": 3},
    "DiT-T/2": {"hidden_size": 32, "depth": 2, "num_heads": 2},
}


def _bilinear(grid_rows, old, new):
    """(old*old, D) -> (new*new, D), written out here with F.interpolate as the reference."""
    d = grid_rows.shape[-1]
    g = grid_rows.reshape(1, old, old, d).permute(0, 3, 1, 2)
    return F.interpolate(g, size=(new, new), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(-1, d)


@pytest.fixture(scope="module")
def source_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("w2s")
    runs = {}
    for name, ov in ARCHS.items():
        run = str(root / name.replace("/", "_"))
        assert main(["train", "--run-dir", run, "--model", name, "--model-overrides", json.dumps(ov),
                     "--steps", "3", *COMMON]) == 0
        runs[name] = run
    return runs


@pytest.mark.parametrize("name", list(ARCHS))
def test_init_interpolates_position_table_and_copies_the_rest(source_runs, name):
    run = source_runs[name]
    d = ckpt.resolve_checkpoint(run)
    state = ckpt.read_state(d)
    src = ckpt.load_tensors(d, "ema")
    big = create_model(**{**state["model_config"], "input_size": 16})
    record = init_model_from(big, run, ema=True)
    assert record["model"] == name and record["step"] == 3 and record["image_size"] == 8
    new = big.state_dict()
    for k, v in src.items():
        if k != "pos_embed":
            assert torch.equal(new[k], v), k  # every resolution-free tensor copied bit for bit
    old_t, new_t = src["pos_embed"], new["pos_embed"]
    assert new_t.shape != old_t.shape
    dim = old_t.shape[-1]
    if name.startswith("DiS"):  # [time, class] tokens then the 4x4 grid -> 8x8
        extra = 2
        assert torch.equal(new_t[0, :extra], old_t[0, :extra])
        assert torch.allclose(new_t[0, extra:], _bilinear(old_t[0, extra:], 4, 8), atol=1e-6)
    elif name.startswith("DiT"):  # fixed sine-cosine table: the exact one of the 8x8 grid
        assert torch.allclose(new_t[0], sincos_pos_embed_2d(dim, 8, 8).to(new_t.dtype), atol=1e-6)
    else:  # DiM: prefix tokens, then a (grid + pad) square whose image block is resized
        p, k = big.num_prefix, big.num_pad
        old_side, new_side = 4 + k, 8 + k
        assert new_t.shape[1] == p + new_side**2
        assert torch.equal(new_t[0, :p], old_t[0, :p])
        og = old_t[0, p:].reshape(old_side, old_side, dim)
        ng = new_t[0, p:].reshape(new_side, new_side, dim)
        ref = _bilinear(og[:4, :4].reshape(-1, dim), 4, 8).reshape(8, 8, dim)
        assert torch.allclose(ng[:8, :8], ref, atol=1e-6)
        assert torch.equal(ng[8:, 8:], og[4:, 4:])
    # raw (non-EMA) weights on request
    raw = ckpt.load_tensors(d, "model")
    big2 = create_model(**{**state["model_config"], "input_size": 16})
    init_model_from(big2, run, ema=False)
    some = next(k for k in raw if k != "pos_embed" and not torch.equal(raw[k], src[k]))
    assert torch.equal(big2.state_dict()[some], raw[some])


@pytest.mark.parametrize("name", list(ARCHS))
def test_cli_fine_tune_at_twice_the_resolution(source_runs, tmp_path, name):
    run = str(tmp_path / "big")
    # no --model: the source's architecture (name + overrides) is reused at the new size
    assert main(["train", "--run-dir", run, "--init-from", source_runs[name], "--image-size", "16",
                 "--steps", "2", *COMMON]) == 0
    state = ckpt.read_state(ckpt.resolve_checkpoint(run))
    assert state["step"] == 2  # step, optimiser and scheduler start fresh
    assert state["model_config"]["name"] == name and state["model_config"]["input_size"] == 16
    assert state["model_config"]["hidden_size"] == 32
    assert state["train_config"]["init_from"] == source_runs[name]
    rec = state["init_from"]
    assert rec["model"] == name and rec["image_size"] == 8 and rec["weights"] == "ema"
    assert os.path.isabs(rec["checkpoint"]) and rec["checkpoint"].endswith("step_0000003")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    # resuming the fine-tune keeps the record and does not reload the source
    assert main(["train", "--run-dir", run, "--resume", "--steps", "3"]) == 0
    assert ckpt.read_state(ckpt.resolve_checkpoint(run))["init_from"] == rec


def test_init_from_errors(source_runs, tmp_path, capsys):
    dis = source_runs["DiS-T/2"]
    cases = [
        (["--init-from", str(tmp_path / "missing")], "no such run folder"),
        (["--init-from", dis, "--model", "DiT-T/2"], "DiS family"),
        (["--init-from", dis, "--model", "DiS-S/2"], "another architecture"),  # same family, other widths
        (["--init-from", dis, "--resume"], "give one of them"),
    ]
    for i, (flags, msg) in enumerate(cases):
        capsys.readouterr()
        assert main(["train", "--run-dir", str(tmp_path / f"r{i}"), "--image-size", "16", "--steps", "1",
                     *COMMON, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (flags, err)


def test_inherited_settings():
    state = {"model_config": {"name": "DiS-T/2"},
             "train_config": TrainConfig(model="DiS-T/2", model_overrides={"depth": 2}, prediction="eps",
                                         learn_sigma=True).to_dict()}
    got = inherit_init_settings({"steps": 5}, state)
    assert got["model"] == "DiS-T/2" and got["model_overrides"] == {"depth": 2}
    assert got["prediction"] == "eps" and got["learn_sigma"] is True and got["steps"] == 5
    # an explicit model of the same family keeps its own registry config; explicit flags win
    got = inherit_init_settings({"model": "DiS-S/2", "prediction": "v"}, state)
    assert "model_overrides" not in got and got["prediction"] == "v"
    with pytest.raises(ValueError, match="family"):
        inherit_init_settings({"model": "DiM-T/2"}, state)


# ------------------------------------------------------------------------------------------ train-time evaluation
def test_when_training_evaluates():
    assert eval_skip_reason(TrainConfig(data="digits")) is None
    assert "inception-weights" in eval_skip_reason(TrainConfig(data="some/folder"))
    assert eval_skip_reason(TrainConfig(data="some/folder", inception_weights="inc.pth")) is None
    assert eval_reference_for(TrainConfig(data="digits")) == "digits"
    assert eval_reference_for(TrainConfig(data="imgs", inception_weights="w")) == "imgs"
    assert eval_reference_for(TrainConfig(data="lat", eval_reference="imgs.npz"), {"latent": True}) == "imgs.npz"
    with pytest.raises(ValueError, match="eval-reference"):
        eval_reference_for(TrainConfig(data="lat", inception_weights="w"), {"latent": True})


def test_non_digit_data_trains_without_evaluating(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = str(tmp_path / "data.npz")
    np.savez(npz, arr_0=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), labels=rng.integers(0, 2, 16))
    run = str(tmp_path / "run")
    flags = [f for f in COMMON if f != "--no-evaluate"]
    assert main(["train", "--run-dir", run, "--data", npz, "--model", "DiT-T/2", "--model-overrides",
                 json.dumps(ARCHS["DiT-T/2"]), "--steps", "1", "--evaluate", *flags]) == 0
    assert not os.path.exists(os.path.join(run, "eval.json"))
    assert "no automatic evaluation" in capsys.readouterr().out
