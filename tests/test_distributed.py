"""Two CPU processes under torchrun (DDP and FSDP2 over gloo) against one process at the same global batch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train import TinyNet, TensorImages, tiny_config
    from ssmdiff.diffusion.gaussian import GaussianDiffusion
    from ssmdiff.train import train
    from ssmdiff.utils import distributed as du

    def run(run_dir, **kw):
        torch.manual_seed(0)
        model = TinyNet()
        s = train(tiny_config(run_dir, **kw), model=model, objective=GaussianDiffusion(steps=100),
                  dataset=TensorImages())
        return model, s

    root = {root!r}
    m_straight, _ = run(os.path.join(root, "ddp"), steps=4, ckpt_every=2)
    run(os.path.join(root, "ddp_resumed"), steps=4, ckpt_every=2, stop_at=2)
    m_resumed, _ = run(os.path.join(root, "ddp_resumed"), steps=4, ckpt_every=2, resume=True)
    run(os.path.join(root, "fsdp"), steps=4, ckpt_every=2, fsdp=True)
    run(os.path.join(root, "fsdp_resumed"), steps=4, ckpt_every=2, stop_at=2, fsdp=True)
    run(os.path.join(root, "fsdp_resumed"), steps=4, ckpt_every=2, resume=True, fsdp=True)
    # DiS with heavy stochastic depth: its blocks run their mixers on the kept samples only (on each rank its own),
    # and a block whose samples are all dropped still gives every parameter a gradient, as DDP requires.
    from ssmdiff.models import create_model
    torch.manual_seed(0)
    dis = create_model("DiS-T/2", input_size=4, in_channels=1, num_classes=3, drop_path_rate=0.9,
                       learn_sigma=False)
    train(tiny_config(os.path.join(root, "ddp_dis"), steps=2, ckpt_every=2), model=dis,
          objective=GaussianDiffusion(steps=100), dataset=TensorImages())
    rank = du.current().rank
    with open(os.path.join(root, f"params_rank{{rank}}.json"), "w") as f:
        json.dump({{"straight": [p.detach().flatten().tolist() for p in m_straight.parameters()],
                   "resumed": [p.detach().flatten().tolist() for p in m_resumed.parameters()]}}, f)
    du.cleanup()
    """
)


def _losses(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.timeout(600)
def test_two_processes_match_one(tmp_path):
    from test_train import losses, run_tiny

    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT.format(tests=HERE, root=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(script)],
        capture_output=True, text=True, env=env, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    single, _ = run_tiny(tmp_path / "single", steps=4, ckpt_every=2)
    ref = losses(tmp_path / "single")
    ddp = _losses(tmp_path / "ddp")
    # rank 0 alone writes: one record per step, not one per process
    assert [s for s, _ in ddp] == [1, 2, 3, 4]
    for s, loss in ddp:
        assert loss == pytest.approx(ref[s], rel=1e-5, abs=1e-6), (s, loss, ref[s])
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["latest", "step_0000002", "step_0000004"]

    assert [s for s, _ in _losses(tmp_path / "ddp_dis")] == [1, 2]

    # resumed 2-process run repeats the uninterrupted one
    resumed = _losses(tmp_path / "ddp_resumed")
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in ddp], abs=1e-6)
    with open(tmp_path / "params_rank0.json") as f:
        p0 = json.load(f)
    with open(tmp_path / "params_rank1.json") as f:
        p1 = json.load(f)
    for a, b, c, d in zip(p0["straight"], p1["straight"], p0["resumed"], single.parameters()):
        assert a == b  # DDP keeps replicas identical
        assert c == pytest.approx(a, abs=1e-6)
        torch.testing.assert_close(torch.tensor(a), d.detach().flatten(), rtol=1e-4, atol=1e-5)

    # FSDP2 (fully_shard) gives the same curve, and its full-state checkpoints resume it exactly
    fsdp = _losses(tmp_path / "fsdp")
    assert [v for _, v in fsdp] == pytest.approx([v for _, v in ddp], rel=1e-5, abs=1e-6)
    fsdp_resumed = _losses(tmp_path / "fsdp_resumed")
    assert [v for _, v in fsdp_resumed] == pytest.approx([v for _, v in fsdp], abs=1e-6)
    from ssmdiff.checkpoint import load_tensors, resolve_checkpoint

    wf = load_tensors(resolve_checkpoint(str(tmp_path / "fsdp")), "model")
    wd = load_tensors(resolve_checkpoint(str(tmp_path / "ddp")), "model")
    assert wf.keys() == wd.keys()  # FSDP checkpoints hold full, unsharded weights under the plain names
    for k in wd:
        torch.testing.assert_close(wf[k], wd[k], rtol=1e-4, atol=1e-5)
