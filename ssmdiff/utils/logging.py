"""Run logging: console lines, a JSONL metrics file, TensorBoard when it is installed, and a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import sys


class MetricsLogger:
    """Append metrics to ``metrics.jsonl`` (one JSON object per line) and to TensorBoard if available.

    On resume the file is truncated to the records logged up to the resumed step, so a run that was stopped and
    resumed has one clean history.
    """

    def __init__(self, run_dir: str, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL is the log of record
                self._tb = None

    def log(self, record: dict) -> None:
        """Write one record (must contain ``step``)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl file (a torn last line from a killed run is ignored)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_loss_curve(metrics_path: str, png_path: str, key: str = "loss") -> str | None:
    """Plot ``key`` against ``step`` (raw and smoothed) from a metrics.jsonl file into a PNG."""
    recs = [r for r in read_metrics(metrics_path) if key in r and "step" in r]
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    vals = [r[key] for r in recs]
    smooth, s = [], None
    for v in vals:
        s = v if s is None else 0.9 * s + 0.1 * v
        smooth.append(s)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, vals, alpha=0.35, label=key)
    ax.plot(steps, smooth, label=f"{key} (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if min(vals) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + f".tmp{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def console(msg: str, enabled: bool = True) -> None:
    """Print a line to stdout (rank 0 only, via ``enabled``), flushing so logs interleave with tqdm."""
    if enabled:
        print(msg, file=sys.stdout, flush=True)
