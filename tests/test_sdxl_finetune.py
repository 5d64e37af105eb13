"""Fine-tuning an imported SDXL pipeline on a folder of captioned images (`diffax train --workdir W
--config.data.name=folder:DIR`): both CLIPs stay frozen, the UNet changes, the loss falls on a tiny set it overfits,
and each image's original size and crop reach the UNet as time ids, as diffusers' train_text_to_image_sdxl
computes them (original size = the image's, crop = the centre crop's top-left, target = the training size).
"""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # import, train step and sampler compiles: minutes on 2 busy cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "tests", "fixtures", "sdxl_pipeline", "pipeline")
CAPTIONS = ["a red square", "a blue circle", "a green line", "a dark spot"]
SIZES = [(16, 16), (24, 16), (16, 20), (32, 32)]  # (h, w): the tall and wide ones are centre-cropped


def _captioned_folder(root) -> str:
    rs = np.random.RandomState(0)
    os.makedirs(root)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i, (caption, (h, w)) in enumerate(zip(CAPTIONS, SIZES)):
            Image.fromarray((rs.rand(h, w, 3) * 255).astype(np.uint8)).save(os.path.join(root, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    from configs.default import get_config
    from diffax import configuration
    from diffax.training import importing, inference, trainer

    tmp = tmp_path_factory.mktemp("sdxlft")
    workdir = str(tmp / "run")
    importing.import_diffusers(PIPELINE, workdir, get_config())
    before = inference.load(workdir, use_ema=False).params
    config = configuration.load(os.path.join(workdir, "config.json"))
    config.data.name = "folder:" + _captioned_folder(tmp / "images")
    config.data.random_flip = False
    t = config.training
    t.num_steps, t.batch_size, t.log_every, t.sample_every, t.checkpoint_every = 20, 4, 5, 0, 20
    t.progress_bar = False
    config.sampling.num_samples, config.sampling.steps = 1, 1
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-3, 0
    trainer.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if "loss" in line]
    return workdir, before, inference.load(workdir, use_ema=False), metrics, config


def test_finetune_trains_the_unet_only(finetuned):
    _, before, run, metrics, _ = finetuned
    assert all(np.isfinite(m["loss"]) for m in metrics) and metrics[-1]["step"] == 20
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before["net"], run.params["net"])
    assert all(jax.tree.leaves(changed))
    frozen = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), before["text"], run.params["text"])
    assert all(jax.tree.leaves(frozen)) and len(jax.tree.leaves(before["text"])) > 20  # both CLIPs


def test_finetune_loss_falls(finetuned):
    losses = [m["loss"] for m in finetuned[3]]
    assert losses[-1] < losses[0], losses


def test_batches_carry_each_images_size_ids(finetuned):
    """The training batches hold (original h, w, crop top, left) per image; the step puts them in the time ids."""
    from diffax.data import iterator

    config = finetuned[4]
    run = finetuned[2]
    batches = iterator.make_iterator(config, tokenizer_for=lambda source: run.tokenizer)
    batch = next(batches)
    got = sorted(map(tuple, np.asarray(batch["size_ids"]).tolist()))
    assert got == sorted([(16, 16, 0, 0), (24, 16, 4, 0), (16, 20, 0, 2), (32, 32, 0, 0)])
