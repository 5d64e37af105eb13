"""`diffax import-diffusers`: a diffusers UNet2DModel checkpoint or Stable Diffusion pipeline folder as a diffax run
(step 0) to sample or fine-tune; `diffax export-diffusers`: a run's UNet and scheduler back in diffusers' format."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from diffax import parallel
from diffax.models.diffusers_sd import load_any
from diffax.training import checkpoint, latent
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
    sampler come from the diffusers checkpoint (for a Stable Diffusion pipeline also the
    autoencoder and text encoder(s), copied into <workdir>/pipeline by `own_components`);
    everything else (data source, optimizer, training length) from `base_config`. Weights and EMA both start
    as the imported weights. Returns the resolved config.
    """
    if checkpoint.latest_step(workdir) is not None:
        raise TrainingError(f"{workdir!r} already holds checkpoints; import into a new --workdir.")
    overrides, model = load_any(src_dir)  # a Stable Diffusion pipeline, or a UNet2DModel folder
    if "text" in overrides:  # a Stable Diffusion pipeline: the run keeps its own VAE and text encoders
        own_components(overrides, workdir, copy=jax.process_index() == 0)
    config = ml_collections.ConfigDict(base_config.to_dict())
    merge(config, overrides)
    prepare_workdir(workdir, config)
    latent.record_autoencoder(workdir, config)  # SD pipelines: the VAE the run samples through
    if jax.process_index() == 0:
        import json
        import os

        from diffax.training.workdir import IMPORTED_NAME

        with open(os.path.join(workdir, IMPORTED_NAME), "w", encoding="utf-8") as f:
            json.dump({"src": os.path.abspath(src_dir)}, f, indent=2)

    diffusion = build(config)
    imported = nnx.split(model, nnx.Param, ...)[1]
    if jax.tree.structure(imported) != jax.tree.structure(diffusion.params["net"]):
        raise TrainingError("The imported UNet's weights do not match the network its config builds (a diffax bug).")
    diffusion.params = {**diffusion.params, "net": imported}  # the schedule's and a text encoder's as built
    tx, _, shardings = state_layout(diffusion, config, parallel.make_mesh(config.mesh))
    state = jax.device_put(init_state(diffusion, tx, len(config.training.posthoc_ema)), shardings)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints, async_save=False)
    try:
        ckpt.save(0, state)
        ckpt.wait()
    finally:
        ckpt.close()
    return config


PIPELINE_DIR = "pipeline"  # <workdir>/pipeline: an imported Stable Diffusion pipeline's VAE, text encoders, tokenizers


def own_components(overrides: ml_collections.ConfigDict, workdir: str, copy: bool = True) -> None:
    """Put the pipeline folders an imported run reads (vae/, text_encoder*/, tokenizer*/, model_index.json) in
    <workdir>/pipeline, hard-linked where the file system allows (else copied), and point the run's config at
    them, so the run no longer needs the pipeline folder it came from. copy=False: the paths only (other hosts)."""
    import os
    import shutil

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, dst)

    text = overrides.text
    src = os.path.dirname(os.path.normpath(str(text.encoder)))
    dst = os.path.join(os.path.abspath(workdir), PIPELINE_DIR)
    xl = bool(text.get("encoder_2", ""))
    folders = ("vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if xl else ())
    if copy:
        os.makedirs(dst, exist_ok=True)
        for folder in folders:
            if os.path.isdir(os.path.join(src, folder)):
                shutil.copytree(os.path.join(src, folder), os.path.join(dst, folder), copy_function=link_or_copy,
                                dirs_exist_ok=True)
        if os.path.exists(os.path.join(src, "model_index.json")):
            link_or_copy(os.path.join(src, "model_index.json"), os.path.join(dst, "model_index.json"))
    overrides.autoencoder.path = os.path.join(dst, "vae")
    text.encoder = os.path.join(dst, "text_encoder")
    if xl:
        text.encoder_2 = os.path.join(dst, "text_encoder_2")


def export_diffusers(workdir: str, output: str, *, use_ema: bool = True, step: int | None = None) -> dict:
    """Write the run's UNet (EMA weights unless use_ema=False) as <output>/unet and its scheduler as
    <output>/scheduler in diffusers' format (UNet2DModel, or UNet2DConditionModel for a text run).
    For a run imported from a Stable Diffusion pipeline, the pipeline's other folders (vae, text_encoder,
    tokenizer, model_index.json) are copied beside them, so diffusers loads <output> as a pipeline."""
    import os
    import shutil

    from diffax.models.diffusers_sd import export_unet
    from diffax.training import inference

    if os.path.exists(output) and os.listdir(output):
        raise TrainingError(f"--output {output} exists and is not empty: export into a new folder.")
    run = inference.load(workdir, step=step, use_ema=use_ema)
    # a LoRA run: the adapters merged into the base weights, W + (alpha / r) A B
    net = nnx.merge(run.diffusion.net_graphdef, jax.device_get(run.diffusion.net_params(run.params)),
                    run.diffusion.net_rest)
    context_dim = int(getattr(net, "context_dim", 0) or 0)
    cfg = export_unet(net, run.config, output, context_dim=context_dim)
    config = run.config
    if cfg["_class_name"] == "UNet2DConditionModel":
        src = os.path.dirname(os.path.normpath(str(config.text.encoder)))
        index = os.path.join(src, "model_index.json")
        if os.path.exists(index) and os.path.normpath(str(config.autoencoder.path)) == os.path.join(src, "vae"):
            xl = bool(config.text.get("encoder_2", ""))  # SDXL: the second CLIP and its tokenizer too
            for folder in ("vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if xl else ()):
                shutil.copytree(os.path.join(src, folder), os.path.join(output, folder))
            shutil.copy(index, os.path.join(output, "model_index.json"))
            import json

            with open(os.path.join(output, "model_index.json"), encoding="utf-8") as f:
                model_index = json.load(f)
            with open(os.path.join(output, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
                model_index["scheduler"] = ["diffusers", json.load(f)["_class_name"]]
            with open(os.path.join(output, "model_index.json"), "w", encoding="utf-8") as f:
                json.dump(model_index, f, indent=2)
    return dict(step=run.step, unet=cfg)


def export_lora(workdir: str, output: str, *, use_ema: bool = True, step: int | None = None) -> dict:
    """Write a LoRA run's adapters (EMA unless use_ema=False) as one safetensors file in diffusers' PEFT naming,
    `unet.<module>.lora_A.weight` [r, in] and `unet.<module>.lora_B.weight` [out, r] with <module> the
    UNet2DConditionModel's (e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q), which
    `pipe.load_lora_weights(output)` reads. The scale alpha / r is folded into lora_B, so the file means
    W + B A (lora_alpha = r), and the adapter's config is stored as diffusers' `lora_adapter_metadata`."""
    import json
    import os

    import numpy as np
    from safetensors.numpy import save_file

    from diffax.errors import UserError
    from diffax.models import lora as lora_lib
    from diffax.models.diffusers_sd import _cond_source_for
    from diffax.training import inference

    if os.path.exists(output):
        raise TrainingError(f"--output {output} exists: write the adapters to a new file.")
    run = inference.load(workdir, step=step, use_ema=use_ema)
    if "lora" not in run.params:
        raise UserError(f"{workdir} is not a LoRA run (config.lora.rank=0): use diffax export-diffusers for its UNet.")
    net = nnx.merge(run.diffusion.net_graphdef, jax.device_get(run.params["net"]), run.diffusion.net_rest)
    if not getattr(net, "context_dim", 0):
        raise UserError("diffax export-lora writes adapters of a text-conditioned UNet (UNet2DConditionModel); "
                        f"{workdir} has no cross-attention.")
    source = _cond_source_for(dict(use_linear_projection=bool(run.config.model.use_linear_projection)))
    flat = lora_lib.adapters(jax.device_get(run.params["lora"]))
    scale = run.diffusion.lora_scale
    tensors, modules = {}, []
    for path in lora_lib.target_layers(net, tuple(run.config.lora.targets)):
        prefix, kind = source(tuple(path) + ("kernel",))
        if kind != "linear":
            raise UserError(f"config.lora.targets: {'.'.join(map(str, path))} has no diffusers linear layer to adapt")
        ab = flat[tuple(str(p) for p in path)]
        tensors[f"unet.{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
        tensors[f"unet.{prefix}.lora_B.weight"] = np.ascontiguousarray(scale * np.asarray(ab["b"], np.float32).T)
        modules.append(prefix)
    rank = int(run.config.lora.rank)
    names = sorted({".".join(m.rsplit(".", 2)[1:]) if m.endswith(".0") else m.rsplit(".", 1)[1]
                    for m in modules})  # to_q, to_k, to_v, to_out.0
    # diffusers' save_lora_weights layout: the PEFT LoraConfig fields, prefixed with the component
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": rank,
                                                     "unet.target_modules": names}, sort_keys=True)}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_file(tensors, output, metadata=metadata)
    return dict(step=run.step, tensors=len(tensors), rank=rank)
