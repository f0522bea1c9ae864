"""Backbones as diffusers models (bit-exact save/load, config round trip, clear errors) and run export."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ssmdiff.hub import export_pipeline, is_pipeline_folder, load_pipeline_run
from ssmdiff.models import create_model, load_model
from ssmdiff.models.dis import DiS
from ssmdiff.models.dit import DiT

FAMILIES = {
    "DiT-T/2": dict(hidden_size=32, depth=2, num_heads=2),
    "DiS-T/2": dict(hidden_size=32, depth=2, drop_path_rate=0.0, d_state=8),
    "DiM-T/1": dict(hidden_size=32, depth=3),
    "DiffuSSM-T": dict(hidden_size=32, depth=2),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = create_model(name, input_size=8, in_channels=3, num_classes=5, **FAMILIES[name])
    with torch.no_grad():  # give the zero-initialised heads values, so equal outputs mean equal weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _public(cfg):
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_load_bit_exact_and_config_round_trip(tmp_path, name):
    model = _model(name)
    model.save_pretrained(tmp_path / "m")
    files = sorted(os.listdir(tmp_path / "m"))
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    with open(tmp_path / "m" / "config.json") as f:
        saved = json.load(f)
    assert saved["name"] == name and saved["_class_name"] == type(model).__name__
    # the safetensors keys are exactly the trainer's state-dict keys
    assert set(load_file(tmp_path / "m" / "diffusion_pytorch_model.safetensors")) == set(model.state_dict())

    for loaded in (load_model(tmp_path / "m"), type(model).from_pretrained(tmp_path / "m")):
        assert type(loaded) is type(model) and loaded.model_name == name
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert _public(loaded.config) == _public(model.config)  # diffusers adds private keys on save
        x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 700.0]), torch.tensor([1, 4])
        with torch.no_grad():
            assert torch.equal(model(x, t, y), loaded.eval()(x, t, y))

    # the registry rebuilds the architecture from the loaded (diffusers) config, private keys and all
    rebuilt = create_model(**loaded.config)
    assert rebuilt.config == _public(model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in a.items()}


def test_config_records_overrides_and_is_json(tmp_path):
    model = create_model("DiS-T/2", input_size=8, in_channels=1, num_classes=0, mixer="mamba2", d_state=16,
                         drop_path_rate=0.0)
    cfg = json.loads(json.dumps(model.config))
    assert cfg["name"] == "DiS-T/2" and cfg["mixer"] == "mamba2" and cfg["d_state"] == 16
    assert cfg["num_classes"] == 0 and cfg["in_channels"] == 1
    model.save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").config["mixer"] == "mamba2"


def test_other_architecture_fails_clearly(tmp_path):
    _model("DiS-T/2").save_pretrained(tmp_path / "dis")
    with pytest.raises(ValueError, match="holds a DiS model .DiS-T/2., not a DiT"):
        DiT.from_pretrained(tmp_path / "dis")
    _model("DiT-T/2").save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match="holds a DiT model"):
        DiS.from_pretrained(tmp_path / "dit")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_model(tmp_path / "nothing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    os.makedirs(tmp_path / "unet")
    with open(tmp_path / "unet" / "config.json", "w") as f:  # another diffusers model's folder
        json.dump({"_class_name": "UNet2DModel", "sample_size": 8}, f)
    with pytest.raises(ValueError, match="holds a UNet2DModel model, not an ssmdiff backbone"):
        load_model(tmp_path / "unet")


# ---------------------------------------------------------------------------------------------- export of a run
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from ssmdiff.train import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("hub") / "run"
    cfg = TrainConfig(model="DiT-T/2", model_overrides={"hidden_size": 32, "depth": 2, "num_heads": 2},
                      data="digits", steps=4, batch_size=8, warmup_steps=1, log_every=1, ckpt_every=4,
                      sample_every=0, samples_per_class=1, eval_samples_per_class=2, sampler="dpm++2m",
                      sample_steps=3, guidance_scale=2.0, evaluate=True, progress=False, run_dir=str(run_dir),
                      diffusion_steps=100)
    summary = train(cfg)
    return str(run_dir), summary


def test_export_run_then_sample(trained_run, tmp_path):
    from ssmdiff.pipeline import SSMDiffPipeline
    from ssmdiff.sample import _batch_seed, generate, load_run

    run_dir, summary = trained_run
    out = export_pipeline(run_dir, tmp_path / "export")
    assert is_pipeline_folder(out) and not is_pipeline_folder(run_dir)
    assert {"model_index.json", "transformer", "scheduler", "README.md", "ssmdiff.json"} <= set(os.listdir(out))
    assert "vae" not in os.listdir(out)  # a pixel-space run

    card = open(os.path.join(out, "README.md")).read()
    with open(os.path.join(run_dir, "eval.json")) as f:
        evals = json.load(f)
    assert "digits" in card and "Steps: 4" in card
    assert f"| accuracy | {evals['accuracy']:.4g} |" in card and f"| fd | {evals['fd']:.4g} |" in card

    # The exported pipeline, `ssmdiff sample` on the run and `ssmdiff sample` on the folder agree pixel for pixel.
    pipe = SSMDiffPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    seed = 4
    pil = pipe(class_labels=[3, 5], num_inference_steps=3, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(_batch_seed(seed, 0)), output_type="pil").images
    from_pipe = np.stack([np.asarray(p) for p in pil])[..., None]
    run = load_run(run_dir)
    images, labels = generate(run, num_images=2, batch_size=2, sampler="dpm++2m", steps=3, guidance_scale=2.0,
                              classes=[3, 5], seed=seed, progress=False)
    assert labels.tolist() == [3, 5]
    assert np.array_equal(from_pipe, images)
    folder_run = load_pipeline_run(out)
    assert folder_run.train_config["sampler"] == "dpm++2m" and folder_run.step == 4
    assert folder_run.num_classes == 10 and folder_run.shape_chw == (1, 8, 8)
    again, _ = generate(folder_run, num_images=2, batch_size=2, sampler=folder_run.train_config["sampler"],
                        steps=3, guidance_scale=2.0, classes=[3, 5], seed=seed, progress=False)
    assert np.array_equal(again, images)
    # the exported weights are the run's EMA weights, bit for bit
    a, b = run.model.state_dict(), pipe.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_options_and_errors(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = export_pipeline(os.path.join(run_dir, "checkpoints", "step_0000004"), tmp_path / "e", sampler="ddpm",
                          ema=False)
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["_class_name"] == "DDPMScheduler"
    with open(os.path.join(out, "ssmdiff.json")) as f:
        assert json.load(f)["ema"] is False
    with pytest.raises(ValueError, match="not empty"):
        export_pipeline(run_dir, out)
    export_pipeline(run_dir, out, overwrite=True)  # replacing an earlier export is allowed
    with pytest.raises(ValueError, match="ddim"):
        export_pipeline(run_dir, tmp_path / "d", sampler="ddim")
    with pytest.raises(FileNotFoundError):
        export_pipeline(tmp_path / "no-run", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not an ssmdiff pipeline folder"):
        load_pipeline_run(run_dir)


# ------------------------------------------------------------------------------------------- the CLI around it
def test_cli_export_then_sample_and_evaluate_folder(trained_run, tmp_path, capsys):
    from ssmdiff.cli import main

    run_dir, _ = trained_run
    out = str(tmp_path / "pipe")
    assert main(["export", run_dir, out, "--sampler", "dpm++2m"]) == 0
    assert is_pipeline_folder(out)
    assert main(["export", run_dir, out]) == 2  # occupied: one clear error line, no traceback
    assert "not empty" in capsys.readouterr().err
    assert main(["export", run_dir, out, "--overwrite", "--no-ema"]) == 0
    with open(os.path.join(out, "ssmdiff.json")) as f:
        assert json.load(f)["ema"] is False
    assert main(["export", run_dir, out, "--overwrite"]) == 0

    # same seed, sampler and steps: the folder and its run give identical images
    common = ["--num-images", "5", "--batch-size", "3", "--sampler", "dpm++2m", "--steps", "3", "--seed", "2",
              "--guidance-scale", "2.0", "--no-progress", "--no-singles"]
    assert main(["sample", run_dir, "--out", str(tmp_path / "from_run"), *common]) == 0
    assert main(["sample", out, *common]) == 0  # default output folder: inside the pipeline folder
    default_out = os.path.join(out, "samples", "sample-step4-seed2")
    run_npz, folder_npz = str(tmp_path / "from_run" / "samples.npz"), os.path.join(default_out, "samples.npz")
    with np.load(run_npz) as a, np.load(folder_npz) as b:
        assert a["arr_0"].shape == (5, 8, 8, 1)
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])

    # evaluate generates from a pipeline folder, then scores
    capsys.readouterr()
    assert main(["evaluate", out, "--num-images", "10", "--steps", "2", "--metrics", "accuracy,fd"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_samples"] == 10 and 0.0 <= res["accuracy"] <= 1.0 and "fd" in res


def test_cli_evaluate_image_folder_keeps_class_labels(trained_run, tmp_path, capsys):
    """A folder of `_class{k}` PNGs is scored with those labels (class accuracy needs them)."""
    from ssmdiff.cli import main
    from ssmdiff.evaluate import load_image_batch

    run_dir, _ = trained_run
    sdir = str(tmp_path / "s")
    assert main(["sample", run_dir, "--num-images", "6", "--classes", "2,7", "--steps", "2", "--out", sdir,
                 "--no-progress"]) == 0
    images_dir = os.path.join(sdir, "images")
    _, labels = load_image_batch(images_dir)
    assert sorted(labels.tolist()) == [2, 2, 2, 7, 7, 7]
    capsys.readouterr()
    assert main(["evaluate", images_dir, "--metrics", "accuracy"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main(["evaluate", os.path.join(sdir, "samples.npz"), "--metrics", "accuracy"]) == 0
    from_npz = json.loads(capsys.readouterr().out)
    assert "accuracy" in from_folder and from_folder["accuracy"] == from_npz["accuracy"]


def test_cli_sample_above_trained_resolution(trained_run, tmp_path, capsys):
    """`ssmdiff sample --image-size 2N [--upsample-guidance]` on a run trained at N (here DiT at 8x8)."""
    from ssmdiff.cli import main

    run_dir, _ = trained_run
    common = ["--num-images", "2", "--classes", "1", "--sampler", "dpm++2m", "--steps", "3", "--seed", "3",
              "--no-progress", "--no-singles"]

    def images(name, *flags):
        out = str(tmp_path / name)
        assert main(["sample", run_dir, "--out", out, *common, *flags]) == 0
        with np.load(os.path.join(out, "samples.npz")) as z:
            return z["arr_0"]

    trained = images("trained")
    assert np.array_equal(images("same", "--image-size", "8"), trained)  # the trained size changes nothing
    plain = images("plain", "--image-size", "16")
    assert plain.shape == (2, 16, 16, 1)
    off = images("off", "--image-size", "16", "--upsample-guidance", "--ug-weight", "0")
    on = images("on", "--image-size", "16", "--upsample-guidance")
    assert np.array_equal(off, plain)  # weight 0: plain sampling at 16x16
    assert on.shape == plain.shape and not np.array_equal(on, plain)
    with open(tmp_path / "on" / "sampling.json") as f:
        rec = json.load(f)
    assert rec["image_size"] == 16 and rec["upsample_guidance"] == {"weight": 1.0, "fraction": 0.3}
    capsys.readouterr()
    assert main(["sample", run_dir, "--upsample-guidance", *common]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert main(["sample", run_dir, "--image-size", "12", "--upsample-guidance", *common]) == 2
    assert "2x, 3x" in capsys.readouterr().err
