"""Fine-tuning an imported Stable Diffusion pipeline on a folder of captioned images: `diffax train --workdir W
--config.data.name=folder:DIR` runs without --force, encodes the images with the frozen VAE on the fly, keeps the
CLIP text encoder frozen, changes the UNet, and the loss falls on a tiny set it overfits.
"""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # import, train step and sampler compiles: ~2 min on 2 busy cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline", "pipeline")
CAPTIONS = ["a red square", "a blue circle", "a green line", "a dark spot"]


def _captioned_folder(root) -> str:
    rs = np.random.RandomState(0)
    os.makedirs(root)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i, caption in enumerate(CAPTIONS):
            Image.fromarray((rs.rand(16, 16, 3) * 255).astype(np.uint8)).save(os.path.join(root, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    from configs.default import get_config
    from diffax import configuration
    from diffax.training import importing, inference, trainer

    tmp = tmp_path_factory.mktemp("sdft")
    workdir = str(tmp / "run")
    importing.import_diffusers(PIPELINE, workdir, get_config())
    before = _pipeline_weights()
    config = configuration.load(os.path.join(workdir, "config.json"))
    config.data.name = "folder:" + _captioned_folder(tmp / "images")
    t = config.training
    t.num_steps, t.batch_size, t.log_every, t.sample_every, t.checkpoint_every = 20, 4, 5, 0, 20
    t.progress_bar = False
    config.sampling.num_samples, config.sampling.steps = 1, 1
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-3, 0
    trainer.train(config, workdir)  # a changed data / optimizer on an imported, untrained run: no --force
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if "loss" in line]
    return workdir, before, inference.load(workdir, use_ema=False), metrics


def _pipeline_weights() -> dict:
    """The pipeline's UNet and CLIP weights as the run's params["net"] / params["text"] hold them."""
    from flax import nnx

    from diffax.models.diffusers_sd import load_cond_unet
    from diffax.models.text.pretrained import load_text_encoder

    unet = load_cond_unet(os.path.join(PIPELINE, "unet"))[-1]
    text = load_text_encoder(os.path.join(PIPELINE, "text_encoder"))[0]
    return {"net": nnx.split(unet, nnx.Param, ...)[1], "text": nnx.split(text, nnx.Param, ...)[1]}


def test_finetune_trains_the_unet_only(finetuned):
    _, before, run, metrics = finetuned
    after = run.params
    assert all(np.isfinite(m["loss"]) for m in metrics) and metrics[-1]["step"] == 20
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before["net"], after["net"])
    assert all(jax.tree.leaves(changed))
    frozen = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), before["text"], after["text"])
    assert all(jax.tree.leaves(frozen))


def test_finetune_loss_falls(finetuned):
    _, _, _, metrics = finetuned
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0], losses


def test_finetuned_run_samples_with_prompts(finetuned):
    run = finetuned[2]
    out = run.draw(2, seed=0, labels=run.prompt_tokens(CAPTIONS[:2]), progress=False)
    assert out["images"].shape == (2, 16, 16, 3) and out["images"].std() > 0
    assert os.path.exists(os.path.join(finetuned[0], "samples", "step_00000020.png"))


def test_finetune_on_cached_latents_with_captions(tmp_path):
    """`diffax encode-data` keeps a text data set's captions (captions.jsonl), so an imported pipeline can also
    fine-tune on `latents:DIR` (the images encoded once)."""
    from configs.default import get_config
    from diffax import configuration
    from diffax.data.latents import latents_source
    from diffax.training import importing, trainer
    from diffax.training.encode_data import encode_data

    workdir = str(tmp_path / "run")
    importing.import_diffusers(PIPELINE, workdir, get_config())
    config = configuration.load(os.path.join(workdir, "config.json"))
    config.data.name = "folder:" + _captioned_folder(tmp_path / "images")
    encode_data(config, str(tmp_path / "cache"), shard_size=3, batch_size=2, progress=False)
    source = latents_source(str(tmp_path / "cache"), config)
    assert sorted(c for i in source.records for c in source.captions(i)) == sorted(CAPTIONS)
    config.data.name = f"latents:{tmp_path / 'cache'}"
    t = config.training
    t.num_steps, t.batch_size, t.log_every, t.sample_every, t.checkpoint_every = 4, 2, 2, 0, 4
    t.progress_bar = False
    config.sampling.num_samples, config.sampling.steps = 1, 1
    metrics = trainer.train(config, workdir)
    assert np.isfinite(metrics["loss"])
