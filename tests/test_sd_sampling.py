"""An imported Stable Diffusion pipeline samples what diffusers' StableDiffusionPipeline draws from the same
weights, noise, prompts, scheduler (DDIM; PNDM as SD 1.x ships; Euler), step count and guidance scale.

Fixture: tests/fixtures/make_sd_pipeline_fixture.py.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline")
PIPELINE = os.path.join(FIXTURE, "pipeline")


@pytest.fixture(scope="module")
def expected():
    return np.load(os.path.join(FIXTURE, "expected.npz"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from configs.default import get_config
    from diffax.training import importing

    path = str(tmp_path_factory.mktemp("sd") / "run")
    importing.import_diffusers(PIPELINE, path, get_config())
    return path


def test_import_writes_a_latent_text_run(workdir):
    from diffax import configuration

    config = configuration.load(os.path.join(workdir, "config.json"))
    own = os.path.join(workdir, "pipeline")  # the run's own VAE and CLIP, hard-linked or copied from the pipeline
    assert config.text.encoder == os.path.join(own, "text_encoder") and not config.text.mask_context
    assert config.autoencoder.path == os.path.join(own, "vae")
    for folder in ("vae", "text_encoder", "tokenizer"):
        for name in os.listdir(os.path.join(PIPELINE, folder)):
            with open(os.path.join(PIPELINE, folder, name), "rb") as a, open(os.path.join(own, folder, name), "rb") as b:
                assert a.read() == b.read(), name
    assert config.data.image_size == 16 and config.data.channels == 3  # 8x8 latents, VAE factor 2
    assert (config.diffusion.schedule, config.sampling.sampler, config.sampling.steps_offset) == ("scaled_linear",
                                                                                                 "ddim", 1)
    assert not config.sampling.final_alpha_one and config.sampling.guidance_scale == 7.5


@pytest.mark.slow  # SD 1.x pipeline images vs diffusers, DDIM and Euler: ~30 s (the UNet and scheduler parity stay in the default run)
def test_sampling_matches_stable_diffusion_pipeline(workdir, expected, tmp_path):
    """StableDiffusionPipeline(prompts, latents, DDIM 4 steps, guidance 3) -> float images in [0, 1] (output_type
    "np"); diffax's decoded samples in [-1, 1] map to them by x / 2 + 0.5. Tolerance 1e-5 absolute on images of
    range 0.70 (std 0.10), i.e. 1.4e-5 of the output's range; measured on CPU: 2.7e-7 max (float32 rounding
    through the text encoder, 8 UNet calls and the VAE decoder)."""
    from diffax import configuration
    from diffax.training import inference

    config = configuration.load(os.path.join(workdir, "config.json"))
    config.sampling.steps, config.sampling.guidance_scale = int(expected["steps"]), float(expected["guidance_scale"])
    run = inference.load(workdir, config=config)
    prompts = [str(p) for p in expected["prompts"]]
    noise = expected["latents"].transpose(0, 2, 3, 1)  # NCHW -> NHWC; DDIM's init_noise_sigma is 1
    images = np.asarray(run.sample_fn(jnp.asarray(noise), jax.random.key(0), jnp.asarray(run.prompt_tokens(prompts))))
    ref = expected["images"]
    np.testing.assert_allclose(np.clip(images / 2 + 0.5, 0, 1), ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_diffax_sample_command_matches_stable_diffusion_pipeline(workdir, expected, tmp_path):
    """`diffax sample --workdir W --prompt ... --noise F.npy`: uint8 samples equal diffusers' images rounded to
    8 bits (within one level, for values that float32 differences put on either side of a rounding edge)."""
    from diffax import cli

    prompts = [str(p) for p in expected["prompts"]]
    ref = expected["images"]
    noise = expected["latents"].transpose(0, 2, 3, 1)
    # the same through the command line: uint8 samples equal diffusers' rounded to 8 bits
    np.save(tmp_path / "noise.npy", noise)
    argv = ["sample", "--workdir", workdir, "--output", str(tmp_path), "--noise", str(tmp_path / "noise.npy"),
            "--num_samples", "2", "--steps", str(int(expected["steps"])), "--guidance_scale",
            str(float(expected["guidance_scale"]))] + [a for p in prompts for a in ("--prompt", p)]
    cli.run(["diffax", *argv])
    got = np.load(tmp_path / "samples.npz")["images"].astype(int)
    assert np.abs(got - np.round(ref * 255)).max() <= 1




@pytest.mark.slow
def test_export_command_writes_a_pipeline_folder(workdir, tmp_path):
    """`diffax export-diffusers` of the imported run: the pipeline's folders, and a UNet whose tensors are the
    imported ones (the run is at step 0; check_diffusers_export.py runs it in diffusers)."""
    from safetensors.numpy import load_file

    from diffax import cli

    out = tmp_path / "export"
    cli.run(["diffax", "export-diffusers", "--workdir", workdir, "--output", str(out)])
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    want = load_file(os.path.join(PIPELINE, "unet", "diffusion_pytorch_model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _sample_with_scheduler(workdir, expected, scheduler_json: str) -> np.ndarray:
    """The imported run sampled with another diffusers scheduler config (as the fixture's pipeline ran)."""
    import json

    from diffax import configuration
    from diffax.models.diffusers import scheduler_config_to_diffax
    from diffax.models.diffusers_sd import scheduler_options
    from diffax.training import inference

    config = configuration.load(os.path.join(workdir, "config.json"))
    diffusion, sampling = scheduler_config_to_diffax(scheduler_options(json.loads(scheduler_json)))
    config.diffusion.update(diffusion)
    config.sampling.update(sampling)
    config.sampling.steps, config.sampling.guidance_scale = int(expected["steps"]), float(expected["guidance_scale"])
    run = inference.load(workdir, config=config)
    prompts = [str(p) for p in expected["prompts"]]
    noise = expected["latents"].transpose(0, 2, 3, 1)
    images = np.asarray(run.sample_fn(jnp.asarray(noise), jax.random.key(0), jnp.asarray(run.prompt_tokens(prompts))))
    return np.clip(images / 2 + 0.5, 0, 1)


@pytest.mark.slow  # as Euler: the DDIM run checks the pipeline path by default, test_samplers.py PNDM itself
def test_pndm_scheduler_matches_stable_diffusion_pipeline(workdir, expected):
    """SD 1.x's PNDMScheduler (PLMS, skip_prk_steps, steps_offset 1, set_alpha_to_one False): 4 steps are 5 UNet
    calls (the repeated second time step). Tolerance as the DDIM run's (1e-5 absolute on images of range 0.70);
    the PNDM images differ from the DDIM ones by 8.9e-3, so the check separates the two samplers."""
    ref = expected["images_pndm"]
    assert np.abs(ref - expected["images"]).max() > 1e-3
    got = _sample_with_scheduler(workdir, expected, str(expected["pndm_scheduler"]))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.slow  # the DDIM pipeline run is the default check; Euler's grid is checked against diffusers in test_samplers.py
def test_euler_scheduler_matches_stable_diffusion_pipeline(workdir, expected):
    """The same pipeline with EulerDiscreteScheduler.from_config: diffusers scales the latents by init_noise_sigma
    (sqrt(sigma_max^2 + 1)); diffax's euler sampler on diffusers' grid takes the same unit noise."""
    got = _sample_with_scheduler(workdir, expected, str(expected["euler_scheduler"]))  # keeps DDIM's options
    np.testing.assert_allclose(got, expected["images_euler"], atol=1e-5, rtol=0)
