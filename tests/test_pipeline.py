"""SSMDiffPipeline: the same samples as ssmdiff.diffusion.sample, output types, VAE decoding, save/load."""

import numpy as np
import pytest
import torch

from ssmdiff.diffusion import FlowMatching, GaussianDiffusion, sample
from ssmdiff.hub import build_scheduler
from ssmdiff.models import create_model
from ssmdiff.pipeline import SSMDiffPipeline


# Narrow, shallow versions of the tiny configs: the comparisons need a real backbone, not a big one.
SMALL = {"DiT": dict(hidden_size=32, depth=2, num_heads=2), "DiS": dict(hidden_size=32, depth=2, drop_path_rate=0.0),
         "DiM": dict(hidden_size=32, depth=3), "DiffuSSM": dict(hidden_size=32, depth=2)}


def _random_model(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model(name, input_size=8, **{**SMALL[name.split("-")[0]], **kw})
    # Zero-initialised heads (adaLN-Zero, final layer) would make every output 0 and every comparison trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _pipe(model, sched, vae=None):
    pipe = SSMDiffPipeline(transformer=model, scheduler=sched, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dit_sigma():
    return _random_model("DiT-T/2", in_channels=3, num_classes=4, learn_sigma=True)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m", "euler", "heun"])
def test_pipeline_equals_engine_gaussian(dit_sigma, sampler):
    objective = GaussianDiffusion(steps=100, learn_sigma=True)
    sched, _ = build_scheduler(objective, sampler)
    labels = [0, 3, 1]
    got = _pipe(dit_sigma, sched)(class_labels=labels, num_inference_steps=4, guidance_scale=1.5,
                                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    want = sample(dit_sigma, objective, (3, 3, 8, 8), sampler=sampler, steps=4, y=torch.tensor(labels),
                  guidance_scale=1.5, generator=torch.Generator().manual_seed(7), progress=False)
    assert torch.equal(got, want)
    # The run is not trivially constant: another seed gives other samples.
    other = _pipe(dit_sigma, sched)(class_labels=labels, num_inference_steps=4, guidance_scale=1.5,
                                    generator=torch.Generator().manual_seed(8), output_type="latent").images
    assert not torch.allclose(got, other)


def test_pipeline_equals_engine_flow_and_unconditional():
    model = _random_model("DiS-T/2", in_channels=1, num_classes=0, learn_sigma=False)
    objective = FlowMatching()
    sched, sampler = build_scheduler(objective)
    assert sampler == "euler"
    got = _pipe(model, sched)(batch_size=2, num_inference_steps=4, guidance_scale=1.0,
                              generator=torch.Generator().manual_seed(1), output_type="latent").images
    want = sample(model, objective, (2, 1, 8, 8), sampler="euler", steps=4,
                  generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(got, want)


def test_output_types_map_pixels(dit_sigma):
    objective = GaussianDiffusion(steps=100, learn_sigma=True)
    sched, _ = build_scheduler(objective, "dpm++2m")
    pipe = _pipe(dit_sigma, sched)
    kw = dict(class_labels=[2, 1], num_inference_steps=3, guidance_scale=2.0)
    x = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    pt = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pt").images
    npy = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    pil = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pil").images
    assert torch.equal(pt, ((x + 1) / 2).clamp(0, 1))
    assert npy.shape == (2, 8, 8, 3) and np.array_equal(npy, pt.permute(0, 2, 3, 1).numpy())
    expect_u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), expect_u8)
    tup = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], pt)


def test_bad_calls_raise_clear_errors(dit_sigma):
    sched, _ = build_scheduler(GaussianDiffusion(steps=100, learn_sigma=True), "dpm++2m")
    pipe = _pipe(dit_sigma, sched)
    with pytest.raises(ValueError, match="class labels must lie"):
        pipe(class_labels=[4], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], num_inference_steps=2, output_type="jpeg")
    with pytest.raises(ValueError, match="guidance needs class_labels"):
        pipe(batch_size=2, num_inference_steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="one torch.Generator"):
        pipe(class_labels=[0], num_inference_steps=2, generator=[torch.Generator()])
    uncond = _random_model("DiT-T/2", in_channels=3, num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        _pipe(uncond, sched)(class_labels=[0], num_inference_steps=2)
    with pytest.raises(ValueError, match="cannot be exported"):
        build_scheduler(GaussianDiffusion(steps=100), "ddim")


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # One block: no down-sampling, so 8x8 latents decode to 8x8 images; a made-up scaling factor is exercised.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=4, sample_size=8, scaling_factor=0.5).eval()


def test_pipeline_save_load_round_trip_with_vae(tmp_path):
    from ssmdiff.data import decode_latents

    model = _random_model("DiM-T/1", in_channels=4, num_classes=3)
    objective = GaussianDiffusion(steps=100)
    sched, _ = build_scheduler(objective, "ddpm")
    vae = _tiny_vae()
    pipe = _pipe(model, sched, vae)
    kw = dict(class_labels=[0, 2], num_inference_steps=4, guidance_scale=1.5)
    out = pipe(**kw, generator=torch.Generator().manual_seed(5), output_type="pt").images
    latents = sample(model, objective, (2, 4, 8, 8), sampler="ddpm", steps=4, y=torch.tensor([0, 2]),
                     guidance_scale=1.5, generator=torch.Generator().manual_seed(5), progress=False)
    assert torch.equal(out, (decode_latents(latents, vae) / 2 + 0.5).clamp(0, 1))

    pipe.save_pretrained(tmp_path / "pipe")
    loaded = SSMDiffPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is type(model) and type(loaded.scheduler) is type(sched)
    assert loaded.vae is not None and loaded.vae.config.scaling_factor == 0.5
    for a, b in [(model, loaded.transformer), (vae, loaded.vae)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    again = loaded(**kw, generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.equal(again, out)


def test_pipeline_without_vae_round_trip(tmp_path, dit_sigma):
    sched, _ = build_scheduler(GaussianDiffusion(steps=100, learn_sigma=True), "dpm++3m")
    pipe = _pipe(dit_sigma, sched)
    pipe.save_pretrained(tmp_path / "p")
    loaded = SSMDiffPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and loaded.backbone is loaded.transformer
    kw = dict(class_labels=[1], num_inference_steps=3, guidance_scale=1.5, output_type="latent")
    assert torch.equal(pipe(**kw, generator=torch.Generator().manual_seed(2)).images,
                       loaded(**kw, generator=torch.Generator().manual_seed(2)).images)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SSMDiffPipeline.from_pretrained(tmp_path / "missing")
