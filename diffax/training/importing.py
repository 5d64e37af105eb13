"""`diffax import-diffusers`: a diffusers UNet2DModel checkpoint as a diffax run (step 0) to sample or fine-tune."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from diffax import parallel
from diffax.models.diffusers import load_diffusers_unet
from diffax.training import checkpoint
from diffax.training.build import build
from diffax.training.step import init_state, state_layout
from diffax.training.trainer import TrainingError, prepare_workdir


def merge(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict, prefix: str = "config") -> None:
    """Set every field of `overrides` in `config`; a field `config` lacks is an error naming it."""
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(f"The diffusers import sets {prefix}.{key}, which diffax's config does not have.")
        if isinstance(value, ml_collections.ConfigDict):
            merge(config[key], value, f"{prefix}.{key}")
        else:
            config[key] = value


def import_diffusers(src_dir: str, workdir: str, base_config: Any) -> Any:
    """Write `workdir/config.json` and a step-0 checkpoint holding the diffusers UNet's weights.

    The model, image size and (from scheduler_config.json) the schedule and
    sampler come from the diffusers checkpoint; everything else (data source,
    optimizer, training length) from `base_config`. Weights and EMA both start
    as the imported weights. Returns the resolved config.
    """
    if checkpoint.latest_step(workdir) is not None:
        raise TrainingError(f"{workdir!r} already holds checkpoints; import into a new --workdir.")
    overrides, model = load_diffusers_unet(src_dir)
    config = ml_collections.ConfigDict(base_config.to_dict())
    merge(config, overrides)
    prepare_workdir(workdir, config)

    diffusion = build(config)
    imported = nnx.split(model, nnx.Param, ...)[1]
    if jax.tree.structure(imported) != jax.tree.structure(diffusion.params["net"]):
        raise TrainingError("The imported UNet's weights do not match the network its config builds (a diffax bug).")
    diffusion.params = {"net": imported, "schedule": diffusion.params["schedule"]}
    tx, _, shardings = state_layout(diffusion, config, parallel.make_mesh(config.mesh))
    state = jax.device_put(init_state(diffusion, tx, len(config.training.posthoc_ema)), shardings)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints, async_save=False)
    try:
        ckpt.save(0, state)
        ckpt.wait()
    finally:
        ckpt.close()
    return config
