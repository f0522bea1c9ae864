"""Checkpoint files: round trip, atomicity under a crash mid-write, pruning, corrupt and foreign checkpoints."""

import json
import os

import pytest
import torch
from torch import nn

from ssmdiff import checkpoint as ckpt


def _model(width=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width), nn.Linear(width, 2))


def _opt_state(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    opt.step()
    return opt


def _save(root, step, model, opt=None, keep_last=None):
    return ckpt.save_checkpoint(
        str(root), step, model_state=model.state_dict(), ema_state=model.state_dict(),
        optimizer_state=opt.state_dict() if opt else None,
        rng_tensors={"torch.0": torch.get_rng_state()}, state={"train_config": {"lr": 1e-3}},
        keep_last=keep_last,
    )


def test_round_trip_model_and_optimizer(tmp_path):
    model = _model()
    opt = _opt_state(model)
    d = _save(tmp_path, 7, model, opt)
    assert os.path.basename(d) == "step_0000007"
    assert ckpt.resolve_checkpoint(str(tmp_path)) == d
    state = ckpt.read_state(d)
    assert state["step"] == 7 and state["train_config"] == {"lr": 1e-3}
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    ckpt.load_model_weights(other, ckpt.load_tensors(d, "model"), d)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    osd = ckpt.load_optimizer_state(d, state)
    ref = opt.state_dict()
    assert osd["param_groups"] == json.loads(json.dumps(ref["param_groups"]))
    for pid, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(osd["state"][pid][k], v)
    # the restored state loads into a fresh optimiser and gives the same next step
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    opt2.load_state_dict(osd)
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (other, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_no_pickle_in_checkpoint(tmp_path):
    d = _save(tmp_path, 1, _model(), _opt_state(_model()))
    assert sorted(os.listdir(d)) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                     "rng.safetensors", "state.json"]


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    good = _save(tmp_path, 1, model)
    calls = {"n": 0}
    real = ckpt.save_file

    def dying_save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the process "dies" while writing the second file of the next checkpoint
            with open(path, "wb") as f:
                f.write(b"\x00" * 10)
            raise KeyboardInterrupt("killed")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", dying_save_file)
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model)
    monkeypatch.setattr(ckpt, "save_file", real)
    # the pointer and the complete checkpoint are untouched; the half-written one is invisible
    assert ckpt.resolve_checkpoint(str(tmp_path)) == good
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_0000001"]
    restored = _model()
    ckpt.load_model_weights(restored, ckpt.load_tensors(good, "model"), good)
    assert torch.equal(restored[0].weight, _model()[0].weight)
    # the next successful save clears the leftovers
    _save(tmp_path, 3, model, keep_last=5)
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".tmp-")]


def test_latest_missing_falls_back_to_newest_complete(tmp_path):
    m = _model()
    _save(tmp_path, 1, m)
    d2 = _save(tmp_path, 2, m)
    os.remove(os.path.join(tmp_path, "latest"))
    assert ckpt.resolve_checkpoint(str(tmp_path)) == d2


def test_keep_last(tmp_path):
    m = _model()
    for s in range(1, 6):
        _save(tmp_path, s, m, keep_last=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_0000004", "step_0000005"]


def test_resave_same_step(tmp_path):
    m = _model()
    _save(tmp_path, 4, m)
    with torch.no_grad():
        m[0].weight.zero_()
    d = _save(tmp_path, 4, m)
    assert torch.count_nonzero(ckpt.load_tensors(d, "model")["0.weight"]) == 0


def test_truncated_file_is_reported(tmp_path):
    d = _save(tmp_path, 1, _model())
    p = os.path.join(d, "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.read_state(d)


def test_garbage_file_same_size_is_reported(tmp_path):
    d = _save(tmp_path, 1, _model())
    p = os.path.join(d, "model.safetensors")
    size = os.path.getsize(p)
    with open(p, "wb") as f:
        f.write(b"\xff" * size)
    ckpt.read_state(d)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_tensors(d, "model")


def test_missing_file_and_bad_state(tmp_path):
    d = _save(tmp_path, 1, _model())
    os.remove(os.path.join(d, "ema.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="partial"):
        ckpt.read_state(d)
    with open(os.path.join(d, "state.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.read_state(d)


def test_other_architecture_is_one_clear_error(tmp_path):
    d = _save(tmp_path, 1, _model(width=4))
    with pytest.raises(ckpt.CheckpointError, match="another architecture"):
        ckpt.load_model_weights(_model(width=8), ckpt.load_tensors(d, "model"), d)
    with pytest.raises(ckpt.CheckpointError, match="4 unexpected"):
        ckpt.load_model_weights(nn.Sequential(nn.Linear(3, 4)), ckpt.load_tensors(d, "model"), d)


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        ckpt.resolve_checkpoint(str(tmp_path))
