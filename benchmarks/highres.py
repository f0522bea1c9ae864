"""High resolution on the built-in digits: upsample guidance and weak-to-strong fine-tuning, measured.

Starts from a run trained at the digits' own 8x8 (the default main job: `ssmdiff train`) and prints two tables:

1. Training-free 2x sampling (16x16) of that run, without and with upsample guidance for several fractions of the
   trajectory, scored by the built-in digit classifier (class accuracy) next to the run's own 8x8 accuracy.
2. Weak-to-strong: a 16x16 run initialised from the 8x8 run (`ssmdiff train --init-from`) against a 16x16 run from
   scratch, same steps and settings, with class accuracy of every checkpoint.

    python benchmarks/highres.py --run runs/digits-dis --out bench_out/highres

Everything goes through the public CLI / library (ssmdiff.cli, ssmdiff.sample, ssmdiff.evaluate). Results are also
written to OUT/highres.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def score(run_path: str, *, n: int, seed: int, image_size: int | None = None, fraction: float | None = None,
          weight: float = 1.0) -> float:
    from ssmdiff.evaluate import evaluate_samples
    from ssmdiff.sample import generate, load_run

    run = load_run(run_path)
    ug = None if fraction is None else {"fraction": fraction, "weight": weight}
    images, labels = generate(run, num_images=n, batch_size=250, sampler=run.train_config.get("sampler"),
                              steps=run.train_config.get("sample_steps"),
                              guidance_scale=float(run.train_config.get("guidance_scale", 1.0)), seed=seed,
                              progress=False, image_size=image_size, upsample_guidance=ug)
    metrics = evaluate_samples(images, labels=labels, reference="digits", metrics=["accuracy"], floor=False)
    return float(metrics["accuracy"])


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    from ssmdiff.checkpoint import list_checkpoints, read_state

    out = []
    for path in list_checkpoints(os.path.join(run_dir, "checkpoints")):
        out.append((int(read_state(path)["step"]), path))
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/highres.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/digits-dis", help="a run trained at 8x8 (default: the main job's)")
    ap.add_argument("--out", default="bench_out/highres")
    ap.add_argument("--num-images", type=int, default=500, help="samples per measurement (50 per class)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps of each 16x16 run")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-w2s", action="store_true", help="only the upsample-guidance table")
    ap.add_argument("--skip-ug", action="store_true", help="only the weak-to-strong table")
    ap.add_argument("--only", choices=["w2s", "scratch"], default=None,
                    help="train just one arm of the weak-to-strong comparison (run two processes side by side)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.run):
        ap.error(f"{args.run} is not a run folder: train one first with `ssmdiff train`")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from ssmdiff.cli import main as cli

    result = {"run": args.run, "num_images": args.num_images}
    t0 = time.time()
    base = score(args.run, n=args.num_images, seed=args.seed)
    result["accuracy_8x8"] = base
    if not args.skip_ug:
        rows = [("8x8 (trained size)", base),
                ("16x16, no guidance", score(args.run, n=args.num_images, seed=args.seed, image_size=16))]
        for f in args.fractions:
            rows.append((f"16x16, upsample guidance, fraction {f:g}",
                         score(args.run, n=args.num_images, seed=args.seed, image_size=16, fraction=f)))
        result["upsample_guidance"] = [{"setting": s, "accuracy": a} for s, a in rows]
        print(f"\nTraining-free 2x sampling of {args.run} ({args.num_images} samples, digit-classifier accuracy)")
        for s, a in rows:
            print(f"  {s:<42s} {a:6.3f}")
        print(f"  ({time.time() - t0:.0f} s)")

    if not args.skip_w2s:
        common = ["--image-size", "16", "--steps", str(args.steps), "--ckpt-every", str(args.ckpt_every),
                  "--keep-last", str(args.steps // args.ckpt_every + 1), "--sample-every", str(args.steps),
                  "--no-evaluate", "--no-progress", "--seed", str(args.seed), "--overwrite"]
        runs = {"weak-to-strong (init from 8x8)": ["--init-from", args.run],
                "from scratch": []}
        if args.only:
            runs = {k: v for k, v in runs.items() if bool(v) == (args.only == "w2s")}
        table = {}
        for label, extra in runs.items():
            run_dir = os.path.join(args.out, "w2s" if extra else "scratch")
            t1 = time.time()
            rc = cli(["train", "--run-dir", run_dir, *common, *extra])
            if rc:
                print(f"training {label} failed (exit {rc})", file=sys.stderr)
                return rc
            table[label] = [(step, score(path, n=args.num_images, seed=args.seed))
                            for step, path in checkpoints(run_dir)]
            print(f"  trained and scored {label} in {time.time() - t1:.0f} s")
        result["weak_to_strong"] = {k: [{"step": s, "accuracy": a} for s, a in v] for k, v in table.items()}
        print(f"\nWeak-to-strong at 16x16 (accuracy per checkpoint; the 8x8 run itself: {base:.3f})")
        steps = [s for s, _ in next(iter(table.values()))]
        print("  " + f"{'step':<34s}" + "".join(f"{s:>8d}" for s in steps))
        for label, vals in table.items():
            print("  " + f"{label:<34s}" + "".join(f"{a:8.3f}" for _, a in vals))
        for label, vals in table.items():
            first = next((s for s, a in vals if a >= base - 0.02), None)
            result.setdefault("steps_to_reach_8x8_accuracy", {})[label] = first
            print(f"  first checkpoint within 2 points of the 8x8 accuracy, {label}: "
                  f"{first if first is not None else 'not reached'}")
    name = "highres.json" if args.only is None else f"highres-{args.only}.json"
    with open(os.path.join(args.out, name), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
