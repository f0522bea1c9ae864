"""The ``ssmdiff`` command end to end (train, interrupt, resume, sample, evaluate) and its flag validation."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ssmdiff.cli import build_parser, main

TINY = ["--model", "DiS-T/2", "--model-overrides", '{"hidden_size": 32, "depth": 2}', "--batch-size", "16",
        "--lr", "2e-3", "--warmup-steps", "2", "--log-every", "1", "--samples-per-class", "1", "--sample-steps", "2",
        "--eval-samples-per-class", "1", "--no-progress", "--drop-path", "0.0"]


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_train_resume_sample_evaluate(tmp_path, capsys):
    run = str(tmp_path / "run")
    # interrupted after step 2, then resumed with nothing but --resume: the stored settings are reused
    assert main(["train", "--run-dir", run, "--steps", "4", "--ckpt-every", "2", "--stop-at", "2",
                 "--sample-every", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "--resume" in out.strip().splitlines()[-1]
    assert main(["train", "--run-dir", run, "--resume"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("sample grid: ") and lines[-2].endswith("final.png")
    assert lines[-1].startswith("sample more: ssmdiff sample ")

    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4]  # exactness of resume: test_train.py
    for f in ("loss.png", "eval.json", "samples/final.png", "samples/step_0000002.png", "checkpoints/latest"):
        assert os.path.exists(os.path.join(run, f)), f
    ev = json.load(open(os.path.join(run, "eval.json")))
    assert ev["num_samples"] == 10 and 0.0 <= ev["accuracy"] <= 1.0 and "fd" in ev and "floor_fd" in ev
    grid = Image.open(os.path.join(run, "samples", "final.png"))
    assert grid.height >= 10 * 8  # one row per class

    out_dir = str(tmp_path / "samples")
    assert main(["sample", run, "--num-images", "6", "--batch-size", "4", "--steps", "2", "--classes", "3,5",
                 "--seed", "1", "--out", out_dir, "--no-progress"]) == 0
    with np.load(os.path.join(out_dir, "samples.npz")) as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.shape == (6, 8, 8, 1) and arr.dtype == np.uint8
    assert labels.tolist() == [3, 3, 3, 5, 5, 5]
    assert len(os.listdir(os.path.join(out_dir, "images"))) == 6
    assert os.path.exists(os.path.join(out_dir, "grid.png"))
    # same seed, other batch size -> not required equal; same seed and batch size -> identical images
    again = str(tmp_path / "again")
    assert main(["sample", run, "--num-images", "6", "--batch-size", "4", "--steps", "2", "--classes", "3,5",
                 "--seed", "1", "--out", again, "--no-progress", "--no-singles"]) == 0
    with np.load(os.path.join(again, "samples.npz")) as z:
        assert np.array_equal(z["arr_0"], arr)

    capsys.readouterr()
    report = str(tmp_path / "eval.json")
    assert main(["evaluate", os.path.join(out_dir, "samples.npz"), "--reference", "digits",
                 "--metrics", "accuracy,fd", "--out", report]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.load(open(report))
    assert printed["num_samples"] == 6 and "accuracy" in printed and "fd" in printed


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--steps", "0"], "--steps"),
        (["train", "--lr", "abc"], "--lr"),
        (["train", "--compile", "False"], "unrecognized arguments: False"),
        (["train", "--sampler", "magic"], "--sampler"),
        (["train", "--precision", "fp16"], "--precision"),
        (["train", "--model-overrides", "{depth: 2"], "JSON"),
        (["train", "--model-overrides", "[1, 2]"], "JSON object"),
        (["sample", "x", "--num-images", "-3"], "--num-images"),
        (["sample", "x", "--classes", "1,b"], "--classes"),
        (["sample", "x", "--guidance-scale", "-1"], "--guidance-scale"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_boolean_flags_are_real_booleans():
    p = build_parser()
    assert p.parse_args(["train", "--no-hflip"]).hflip is False
    assert p.parse_args(["train", "--compile"]).compile is True
    assert p.parse_args(["sample", "r", "--no-ema"]).ema is False
    assert p.parse_args(["sample", "r"]).ema is True


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sample", "/nonexistent/run"], "no such run"),
        (["evaluate", "/nonexistent/x.npz"], "no samples"),
        (["train", "--model", "DiS-Q/3", "--run-dir", "{tmp}/r", "--no-progress"], "unknown model"),
        (["train", "--data", "/nonexistent/folder", "--run-dir", "{tmp}/r", "--no-progress"], "not found"),
        (["train", "--name", "a", "--run-dir", "{tmp}/r"], "either --name or --run-dir"),
        (["models", "--filter", "NoSuchFamily"], "no model name"),
    ],
)
def test_user_errors_are_one_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_sample_from_a_foreign_checkpoint(tmp_path, capsys):
    bad = tmp_path / "run" / "checkpoints" / "step_0000001"
    bad.mkdir(parents=True)
    (bad / "state.json").write_text("{broken")
    assert main(["sample", str(tmp_path / "run")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_models_table(capsys):
    assert main(["models", "--filter", "DiS-T", "--input-size", "8", "--in-channels", "1", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "DiS-T/2" in out and "DiT" not in out


def test_bench_subcommand_hands_arguments_to_the_benchmark(capsys):
    from ssmdiff.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--tokens", "many"])
    assert exc.value.code == 2
    assert "ssmdiff bench: error: argument --tokens" in capsys.readouterr().err
    from ssmdiff.cli import build_parser

    assert "bench" in build_parser().format_help()
