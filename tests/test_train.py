"""Trainer tests with a tiny stand-in backbone: accumulation, exact resume, weight-decay groups, lr schedule."""

import json
import math
import os

import pytest
import torch
from torch import nn

from ssmdiff.diffusion.gaussian import GaussianDiffusion
from ssmdiff.train import TrainConfig, fused_adamw, lr_lambda_for, param_groups, train


class TinyNet(nn.Module):
    """Smallest model with the backbone call ``model(x, t, y=None)`` (null class at index num_classes)."""

    def __init__(self, channels=1, num_classes=3, width=8):
        super().__init__()
        self.num_classes = num_classes
        self.config = {"name": "tiny", "channels": channels, "num_classes": num_classes, "width": width}
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.t_proj = nn.Linear(2, width)
        self.y_embed = nn.Embedding(num_classes + 1, width)
        self.norm = nn.GroupNorm(2, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, y=None):
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        tt = t.float()[:, None] / 1000.0
        temb = self.t_proj(torch.cat([torch.sin(3 * tt), torch.cos(3 * tt)], dim=1))
        h = self.conv_in(x) + (temb + self.y_embed(y))[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(self.norm(h)))


class TensorImages(torch.utils.data.Dataset):
    """Random images in [-1, 1] with labels and the attributes ssmdiff datasets carry."""

    def __init__(self, n=40, channels=1, size=4, num_classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, channels, size, size, generator=g) * 2 - 1
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        self.num_classes, self.channels, self.image_size = num_classes, channels, size

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def tiny_config(run_dir, **kw):
    base = dict(
        run_dir=str(run_dir), steps=6, batch_size=8, lr=1e-2, warmup_steps=2, lr_schedule="cosine",
        log_every=1, ckpt_every=3, sample_every=0, samples_per_class=0, evaluate=False, progress=False,
        ema_decay=0.9, seed=3, diffusion_steps=100,
    )
    base.update(kw)
    return TrainConfig(**base)


def run_tiny(run_dir, model_seed=0, **kw):
    torch.manual_seed(model_seed)
    model = TinyNet()
    summary = train(tiny_config(run_dir, **kw), model=model, objective=GaussianDiffusion(steps=100),
                    dataset=TensorImages())
    return model, summary


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_grad_accumulation_matches_full_batch(tmp_path):
    full, _ = run_tiny(tmp_path / "full", steps=3, grad_accum=1)
    acc, _ = run_tiny(tmp_path / "acc", steps=3, grad_accum=4)  # 4 micro-batches of 2
    la, lb = losses(tmp_path / "full"), losses(tmp_path / "acc")
    assert la.keys() == lb.keys() == {1, 2, 3}
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-5, abs=1e-6)
    for (n, p), q in zip(full.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_grad_accumulation_really_accumulates(tmp_path):
    """One accumulated step must differ from a step on the last micro-batch alone (guards a no-op accumulation)."""
    acc, _ = run_tiny(tmp_path / "acc", steps=1, grad_accum=4)
    last, _ = run_tiny(tmp_path / "last", steps=1, grad_accum=1, batch_size=2)
    diff = max((p - q).abs().max().item() for p, q in zip(acc.parameters(), last.parameters()))
    assert diff > 1e-4


def test_exact_resume(tmp_path):
    straight, _ = run_tiny(tmp_path / "a")
    stopped, s1 = run_tiny(tmp_path / "b", stop_at=3)
    assert s1["step"] == 3 and os.path.isdir(os.path.join(tmp_path, "b", "checkpoints", "step_0000003"))
    resumed, s2 = run_tiny(tmp_path / "b", model_seed=123, resume=True)  # other init: weights must come from disk
    assert s2["step"] == 6
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys() == set(range(1, 7))
    for s in la:
        assert la[s] == pytest.approx(lb[s], abs=1e-6), s
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    from ssmdiff.checkpoint import load_tensors, resolve_checkpoint

    ea = load_tensors(resolve_checkpoint(str(tmp_path / "a")), "ema")
    eb = load_tensors(resolve_checkpoint(str(tmp_path / "b")), "ema")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=1e-6)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    run_tiny(tmp_path / "r", steps=2, ckpt_every=10)
    with pytest.raises(ValueError, match="--resume"):
        run_tiny(tmp_path / "r", steps=2)
    _, s = run_tiny(tmp_path / "r", steps=2, overwrite=True)
    assert s["step"] == 2


def test_a_bad_setting_fails_before_the_run_folder_is_touched(tmp_path):
    """A model setting that fails to build leaves no folder for a new run, and with --overwrite it leaves the old
    run's checkpoints in place (they used to be removed before the model was built)."""
    run_tiny(tmp_path / "r", steps=2, ckpt_every=10)
    before = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    bad = dict(model="DiT-T/2", model_overrides={"depth": "x"}, overwrite=True)
    with pytest.raises(ValueError, match="wrong type"):
        train(tiny_config(tmp_path / "r", **bad), dataset=TensorImages())
    assert before and sorted(os.listdir(tmp_path / "r" / "checkpoints")) == before
    with pytest.raises(ValueError, match="wrong type"):
        train(tiny_config(tmp_path / "new", **bad), dataset=TensorImages())
    assert not (tmp_path / "new").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    run_tiny(tmp_path / "r", steps=2, ckpt_every=10)
    with pytest.raises(ValueError, match="batch_size"):
        run_tiny(tmp_path / "r", steps=4, batch_size=4, resume=True)


def test_weight_decay_groups():
    model = TinyNet()
    model._no_weight_decay = {"t_proj.weight"}
    groups = param_groups(model, 0.05)
    decay = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decay}
    # only conv weights decay: biases, the norm, the class embedding and the exempted projection do not
    assert names == {"conv_in.weight", "conv_out.weight"}
    assert groups[1]["weight_decay"] == 0.0


def test_fused_adamw_matches_the_per_tensor_loop():
    """The trainer's CPU optimiser is AdamW's fused kernel: same steps as the default per-tensor loop (the
    reference), with both weight-decay groups, over several steps so the moment estimates matter."""
    assert fused_adamw(torch.device("cpu")) and not fused_adamw(torch.device("cpu"), fsdp=True)
    torch.manual_seed(0)
    ref = TinyNet()
    fast = TinyNet()
    fast.load_state_dict(ref.state_dict())
    opts = [torch.optim.AdamW(param_groups(m, 0.05), lr=1e-2, betas=(0.9, 0.99), fused=f)
            for m, f in ((ref, False), (fast, True))]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ref.parameters()]
        for m, opt in zip((ref, fast), opts):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert opts[1].state_dict()["state"].keys() == opts[0].state_dict()["state"].keys()


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda_for(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    g = lr_lambda_for(TrainConfig(steps=110, warmup_steps=10, lr_schedule="constant"))
    assert g(50) == 1.0 and g(109) == 1.0


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=-1), dict(precision="fp16"), dict(lr_schedule="step"),
                                 dict(ema_decay=2.0), dict(objective="gan")])
def test_bad_config_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad).validate()


def test_batch_not_divisible_by_accumulation(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        run_tiny(tmp_path / "r", batch_size=6, grad_accum=4)


def test_bf16_autocast_on_cpu(tmp_path):
    _, s = run_tiny(tmp_path / "r", steps=2, precision="bf16")
    assert math.isfinite(s["loss"])


def test_registry_backbone_with_checkpointing_and_drop_path(tmp_path):
    """Options reach a real backbone: activation checkpointing and the drop-path override."""
    cfg = tiny_config(tmp_path / "r", steps=2, model="DiS-T/2", model_overrides={"hidden_size": 32, "depth": 2},
                      data="digits", grad_checkpointing=True, drop_path=0.2, objective="gaussian",
                      schedule="cosine", prediction="v")
    summary = train(cfg)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    from ssmdiff.checkpoint import read_state, resolve_checkpoint

    state = read_state(resolve_checkpoint(str(tmp_path / "r")))
    assert state["model_config"]["drop_path_rate"] == 0.2 and state["model_config"]["hidden_size"] == 32
    assert state["objective_config"]["prediction"] == "v"
    assert state["data"]["num_classes"] == 10 and state["data"]["image_size"] == 8


@pytest.mark.parametrize("threads, expected", [(None, 1), (2, 2)])
def test_cpu_threads_small_models_default_to_one(tmp_path, threads, expected):
    # Tiny models lose more to thread synchronisation than they gain (see train.SMALL_MODEL_PARAMS);
    # an explicit --threads always wins.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_tiny(str(tmp_path / "run"), steps=1, threads=threads)
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
