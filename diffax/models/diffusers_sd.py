"""Stable Diffusion 1.x / 2.x and XL pipeline folders: import a diffusers `UNet2DConditionModel` (and the whole
pipeline around it) into diffax, and export diffax UNets back to diffusers' format. No PyTorch.

UNet2DConditionModel (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", the SD UNet as diffusers writes it) with CrossAttnDownBlock2D / DownBlock2D,
UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D is the diffax UNet (diffax/models/unet.py)
built with context_dim > 0: its attention layers are then SpatialTransformers, which keep diffusers'
Transformer2DModel names (diffax/models/layers.py). The mapping is one tensor to one parameter;
every tensor must be used and every option diffax does not reproduce is an error naming it
(UnsupportedDiffusersConfig): class embeddings, addition embeddings other than SDXL's "text_time",
only- or dual cross-attention, GLIGEN, other time embeddings, per-level layer counts, per-layer
transformer counts.

SDXL (Podell et al. 2023): per-level transformer_layers_per_block -> config.model.transformer_depths;
addition_embed_type "text_time" -> the UNet's pooled-vector MLP (add_embedding) with its time ids embedded
addition_time_embed_dim wide (config.model.addition_time_embed_dim); text_encoder_2/ + tokenizer_2/ ->
config.text.encoder_2 (diffax/models/text/sdxl.py builds the pipeline's conditioning).

upcast_attention (SD 2.1) only changes half-precision runs (diffusers then computes attention scores
in float32); imported models run in float32 (config.model.dtype), where it changes nothing.

Heads: diffusers' attention_head_dim is, for this class, the number of heads (SD 1.x: 8 heads at
every level); a list gives the heads per level (SD 2.x: 5, 10, 20, 20 heads of 64 channels). diffax
maps equal head counts to config.model.num_heads and a constant width per head to head_channels.

A pipeline folder (model_index.json; unet/, vae/, text_encoder/, tokenizer/, scheduler/) becomes a
latent text-to-image run: the VAE through diffax/models/diffusers_vae.py (config.autoencoder.path),
CLIP through diffax/models/text/pretrained.py (config.text.encoder), the scheduler through
diffax/models/diffusers.py's scheduler mapping. As diffusers' StableDiffusionPipeline, the text
states are CLIP's last hidden state without attention mask, the UNet's cross-attention sees every
token (config.text.mask_context=False), and guidance's null condition is the empty prompt "".
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
from flax import nnx

from diffax.errors import UserError
from diffax.models import build_model
from diffax.models.unet import NUM_TIME_IDS
from diffax.models.diffusers import (
    CONFIG_NAME,
    SCHEDULER_NAME,
    WEIGHTS_NAME,
    UnsupportedDiffusersConfig,
    _read_json,
    _source,
    class_options,
    load_diffusers_unet,
    load_weights,
    model_tensors,
    read_weights,
    scheduler_config_to_diffax,
    transformer_source,
)

log = logging.getLogger(__name__)

# UNet2DConditionModel.__init__ defaults (diffusers 0.2x-0.42): what a config.json without the key means.
UNET2D_CONDITION_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
    transformer_layers_per_block=1, reverse_transformer_layers_per_block=None, encoder_hid_dim=None,
    encoder_hid_dim_type=None, attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False,
    use_linear_projection=False, class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None,
    num_class_embeds=None, upcast_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    projection_class_embeddings_input_dim=None, attention_type="default", class_embeddings_concat=False,
    mid_block_only_cross_attention=None, cross_attention_norm=None, addition_embed_type_num_heads=64,
)
# Options reproduced only at these values; anything else is an error naming the option.
_ONLY: dict[str, Any] = dict(
    center_input_sample=False, only_cross_attention=False, mid_block_scale_factor=1, act_fn="silu",
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    dual_cross_attention=False, class_embed_type=None,
    num_class_embeds=None, resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional",
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    attention_type="default", class_embeddings_concat=False,
    cross_attention_norm=None, mid_block_type="UNetMidBlock2DCrossAttn",
)
_WHY = {
    "class_embed_type": "class embeddings are not mapped", "num_class_embeds": "class embeddings are not mapped",
    "mid_block_type": "only UNetMidBlock2DCrossAttn",
}
CROSS_DOWN, CROSS_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
DOWN_TYPES, UP_TYPES = {CROSS_DOWN, "DownBlock2D"}, {CROSS_UP, "UpBlock2D"}
PIPELINE_COMPONENTS = {  # folder -> classes diffax reads
    "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": None,  # any scheduler of diffax/models/diffusers.py's mapping
}


def _one(value: Any, key: str, n: int) -> Any:
    """A per-level option given as one value or a list of n equal values -> the value."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or len(set(map(str, value))) != 1:
            raise UnsupportedDiffusersConfig(f"UNet2DConditionModel option {key}={list(value)} is not supported: the "
                                             "diffax UNet needs the same value at every level")
        return value[0]
    return value


def cond_unet_config_to_diffax(cfg: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """A UNet2DConditionModel config.json -> (config.model fields, cross_attention_dim, config.data fields of the
    latents: image_size, channels). Raises UnsupportedDiffusersConfig naming what diffax cannot map."""
    c = class_options(cfg, "UNet2DConditionModel", UNET2D_CONDITION_DEFAULTS, "expected a UNet2DConditionModel")
    for key, only in _ONLY.items():
        value = c[key]
        if isinstance(value, (list, tuple)) and key == "only_cross_attention":
            value = any(value)
        if key == "act_fn" and value == "swish":
            continue
        if value != only:
            raise UnsupportedDiffusersConfig(f"UNet2DConditionModel option {key}={c[key]!r} is not supported: "
                                             f"{_WHY.get(key, f'only {only!r} is mapped')}")
    if c["mid_block_only_cross_attention"]:
        raise UnsupportedDiffusersConfig("UNet2DConditionModel option mid_block_only_cross_attention=True is not "
                                         "supported")
    boc = [int(b) for b in c["block_out_channels"]]
    n, ch = len(boc), boc[0]
    downs, ups = list(c["down_block_types"]), list(c["up_block_types"])
    if len(downs) != n or len(ups) != n:
        raise UnsupportedDiffusersConfig("down_block_types / up_block_types / block_out_channels differ in length")
    for names, valid, where in ((downs, DOWN_TYPES, "down"), (ups, UP_TYPES, "up")):
        for name in names:
            if name not in valid:
                raise UnsupportedDiffusersConfig(f"diffusers {where} block type {name!r} is not supported "
                                                 f"(supported: {', '.join(sorted(valid))})")
    if any(b % ch for b in boc):
        raise UnsupportedDiffusersConfig(f"block_out_channels={boc}: every width must be a multiple of the first")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise UnsupportedDiffusersConfig(f"time_embedding_dim={c['time_embedding_dim']}: the UNet's is 4 x {ch}")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise UnsupportedDiffusersConfig(f"resnet_time_scale_shift={c['resnet_time_scale_shift']!r} is not supported")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise UnsupportedDiffusersConfig(f"sample_size={size}: only square latents")
        size = size[0]
    if not isinstance(size, int):
        raise UnsupportedDiffusersConfig(f"sample_size={size!r}: needed to place attention by resolution")
    if int(c["out_channels"]) != int(c["in_channels"]):
        raise UnsupportedDiffusersConfig(f"out_channels={c['out_channels']} differs from in_channels="
                                         f"{c['in_channels']}")
    layers = int(_one(c["layers_per_block"], "layers_per_block", n))
    depth = c["transformer_layers_per_block"]
    if isinstance(depth, (list, tuple)):
        if len(depth) != n or any(isinstance(d, (list, tuple)) for d in depth):
            raise UnsupportedDiffusersConfig(f"UNet2DConditionModel option transformer_layers_per_block={list(depth)} "
                                             f"is not supported: one count per level ({n}) is mapped, not per layer")
        depths = tuple(int(d) for d in depth)
    else:
        depths = (int(depth),) * n
    added = _added_conditions(c)
    context_dim = int(_one(c["cross_attention_dim"], "cross_attention_dim", n))

    attn_down = [size >> i for i, name in enumerate(downs) if name == CROSS_DOWN]
    attn_up = [size >> (n - 1 - i) for i, name in enumerate(ups) if name == CROSS_UP]
    heads = c["num_attention_heads"] or c["attention_head_dim"]  # diffusers: attention_head_dim counts heads here
    heads = [int(h) for h in heads] if isinstance(heads, (list, tuple)) else [int(heads)] * n
    if len(heads) != n:
        raise UnsupportedDiffusersConfig(f"attention_head_dim={heads} needs one entry per level ({n})")
    levels = sorted({i for i, name in enumerate(downs) if name == CROSS_DOWN}
                    | {n - 1 - i for i, name in enumerate(ups) if name == CROSS_UP} | {n - 1})  # n - 1: the middle
    if len({heads[i] for i in levels}) == 1:
        num_heads, head_channels = heads[levels[0]], -1
    elif len({boc[i] / heads[i] for i in levels}) == 1 and boc[levels[0]] % heads[levels[0]] == 0:
        num_heads, head_channels = 1, boc[levels[0]] // heads[levels[0]]
    else:
        raise UnsupportedDiffusersConfig(f"attention_head_dim={heads} with block_out_channels={boc}: the diffax UNet "
                                         "needs the same number of heads, or the same channels per head, at every "
                                         "level with attention")
    model = dict(
        name="unet", channels=ch, channel_mult=tuple(b // ch for b in boc), num_res_blocks=layers,
        attention_resolutions=tuple(attn_down),
        up_attention_resolutions=None if sorted(attn_up) == sorted(attn_down) else tuple(attn_up),
        mid_attention=True, num_heads=num_heads, head_channels=head_channels, dropout=float(c["dropout"]),
        resblock_updown=False, scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift",
        norm_groups=int(c["norm_num_groups"]), norm_eps=float(c["norm_eps"]),
        downsample_padding=int(c["downsample_padding"]), learn_sigma=False, embedding="sinusoidal",
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]), transformer_depth=depths[-1],
        transformer_depths=depths if len(set(depths)) > 1 else (), addition_time_embed_dim=added,
        use_linear_projection=bool(c["use_linear_projection"]), dtype="float32", param_dtype="float32", remat=False,
    )
    return model, context_dim, dict(image_size=int(size), channels=int(c["in_channels"]))


def _added_conditions(c: dict[str, Any]) -> int:
    """addition_embed_type: None (SD 1.x / 2.x) -> 0, or SDXL's "text_time" -> addition_time_embed_dim."""
    kind = c["addition_embed_type"]
    if kind is None:
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if c[key] is not None:
                raise UnsupportedDiffusersConfig(f"UNet2DConditionModel option {key}={c[key]!r} without "
                                                 "addition_embed_type is not supported")
        return 0
    if kind != "text_time":
        raise UnsupportedDiffusersConfig(f"UNet2DConditionModel option addition_embed_type={kind!r} is not supported "
                                         "(only SDXL's 'text_time': pooled text and added time ids)")
    dim, total = c["addition_time_embed_dim"], c["projection_class_embeddings_input_dim"]
    if not dim or not total or int(total) <= NUM_TIME_IDS * int(dim):
        raise UnsupportedDiffusersConfig(f"addition_embed_type='text_time' needs addition_time_embed_dim and "
                                         f"projection_class_embeddings_input_dim > 6 x it (got {dim}, {total})")
    return int(dim)


def added_pooled_dim(cfg: dict[str, Any]) -> int:
    """SDXL: the pooled text width the UNet's add_embedding expects (projection_class_embeddings_input_dim minus
    the 6 embedded time ids); 0 for a UNet without added conditions."""
    c = {**UNET2D_CONDITION_DEFAULTS, **cfg}
    dim = _added_conditions(c)
    return int(c["projection_class_embeddings_input_dim"]) - NUM_TIME_IDS * dim if dim else 0


def cond_source(path: tuple, *, linear_projection: bool) -> tuple[str, str]:
    """diffax UNet parameter path -> (UNet2DConditionModel tensor prefix, leaf kind): the UNet2DModel names of
    diffax/models/diffusers.py, with Transformer2DModel names below each attentions.N."""
    p = list(path)
    if p[0] == "pooled_embed":  # SDXL's add_embedding (TimestepEmbedding: linear_1, SiLU, linear_2)
        return f"add_embedding.{p[1]}", "linear"
    if p[0] == "mid_attn":
        prefix, rest = "mid_block.attentions.0", p[1:]
    elif p[0] in ("down", "up") and p[2] == "attn":
        prefix, rest = f"{p[0]}_blocks.{p[1]}.attentions.{p[3]}", p[4:]
    else:
        return _source(path)
    sub, kind = transformer_source(tuple(rest), linear_projection=linear_projection)
    return f"{prefix}.{sub}", kind


def _cond_source_for(model_fields: dict[str, Any]):
    linear = bool(model_fields.get("use_linear_projection", False))
    return lambda path: cond_source(path, linear_projection=linear)


def load_cond_unet(unet_dir: str) -> tuple[dict[str, Any], int, dict[str, Any], nnx.Module]:
    """A UNet2DConditionModel folder -> (config.model fields, cross_attention_dim, latent data fields, diffax UNet
    with its weights). Tensors that do not match the config are errors naming them."""
    cfg = _read_json(os.path.join(unet_dir, CONFIG_NAME))
    model_fields, context_dim, data_fields = cond_unet_config_to_diffax(cfg)
    shape = (data_fields["image_size"], data_fields["image_size"], data_fields["channels"])
    pooled = added_pooled_dim(cfg)
    pooled_dim = pooled + NUM_TIME_IDS if pooled else 0  # SDXL: the pooled text, then the 6 time ids
    model = nnx.eval_shape(lambda: build_model(ml_collections.ConfigDict(model_fields), data_shape=shape,
                                               num_classes=0, rngs=nnx.Rngs(0), context_dim=context_dim,
                                               pooled_dim=pooled_dim))
    weights = os.path.join(unet_dir, WEIGHTS_NAME)
    try:
        load_weights(model, read_weights(weights), source=_cond_source_for(model_fields), what="UNet")
    except UnsupportedDiffusersConfig as e:
        config_path = os.path.join(unet_dir, CONFIG_NAME)
        raise UnsupportedDiffusersConfig(f"{weights} does not match {config_path}: {e}") from None
    return model_fields, context_dim, data_fields, model


# --------------------------------------------------------------------------- pipeline folders


def _component_class(src: str, folder: str) -> str | None:
    """The class model_index.json names for `folder` (None without model_index.json)."""
    index = os.path.join(src, "model_index.json")
    if not os.path.exists(index):
        return None
    entry = _read_json(index).get(folder)
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def is_sd_pipeline(src: str) -> bool:
    """Does `src` hold a UNet2DConditionModel (a pipeline folder with unet/, or the unet folder itself)?"""
    for folder in (os.path.join(src, "unet"), src):
        path = os.path.join(folder, CONFIG_NAME)
        if os.path.exists(path):
            return _read_json(path).get("_class_name") == "UNet2DConditionModel"
    return _component_class(src, "unet") == "UNet2DConditionModel"


def check_pipeline(src: str) -> bool:
    """A pipeline folder must hold every component diffax needs, each of a class it reads. Returns whether it is
    an SDXL pipeline (its UNet takes SDXL's added conditions; text_encoder_2/ and tokenizer_2/ beside)."""
    if not os.path.isdir(os.path.join(src, "unet")) and os.path.exists(os.path.join(src, CONFIG_NAME)):
        raise UserError(f"{src} is a UNet2DConditionModel folder, not a pipeline: a text-to-image run also needs the "
                        "vae/, text_encoder/, tokenizer/ and scheduler/ beside it. Pass the pipeline folder.")
    for folder, classes in PIPELINE_COMPONENTS.items():
        if not os.path.isdir(os.path.join(src, folder)):
            raise UserError(f"{src} has no {folder}/ folder: a Stable Diffusion pipeline folder needs unet/, vae/, "
                            "text_encoder/, tokenizer/ and scheduler/ (as StableDiffusionPipeline.save_pretrained "
                            "writes them).")
        cls = _component_class(src, folder)
        if classes and cls is not None and cls not in classes:
            raise UnsupportedDiffusersConfig(f"{os.path.join(src, 'model_index.json')}: {folder} is a {cls}, which "
                                             f"diffax does not read (supported: {', '.join(classes)})")
    index = os.path.join(src, "model_index.json")
    info = _read_json(index) if os.path.exists(index) else {}
    if info.get("requires_aesthetics_score") or info.get("_class_name", "").startswith("StableDiffusionXLImg2Img"):
        raise UnsupportedDiffusersConfig(f"{index}: an SDXL refiner / img2img pipeline (requires_aesthetics_score, "
                                         "aesthetic-score time ids) is not imported; diffax imports the SDXL base "
                                         "pipeline (StableDiffusionXLPipeline)")
    unet_cfg = _read_json(os.path.join(src, "unet", CONFIG_NAME))
    xl = unet_cfg.get("addition_embed_type") == "text_time"
    has_2 = _component_class(src, "text_encoder_2") is not None or os.path.isdir(os.path.join(src, "text_encoder_2"))
    if has_2 and not xl:
        raise UnsupportedDiffusersConfig(f"{src} has a second text encoder (text_encoder_2/) but its UNet has no SDXL "
                                         "added conditions (addition_embed_type='text_time'); diffax imports SD 1.x / "
                                         "2.x (one CLIP) and SDXL pipelines")
    if xl:
        for folder, classes in (("text_encoder_2", ("CLIPTextModelWithProjection",)),
                                ("tokenizer_2", PIPELINE_COMPONENTS["tokenizer"])):
            if not os.path.isdir(os.path.join(src, folder)):
                raise UserError(f"{src} has no {folder}/ folder: an SDXL pipeline (its UNet's addition_embed_type is "
                                "'text_time') needs text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/")
            cls = _component_class(src, folder)
            if cls is not None and cls not in classes:
                raise UnsupportedDiffusersConfig(f"{index}: {folder} is a {cls}; SDXL's is a {classes[0]}")
        if info.get("force_zeros_for_empty_prompt", True) is not True:
            raise UnsupportedDiffusersConfig(f"{index}: force_zeros_for_empty_prompt=false is not supported (diffax's "
                                             "SDXL null condition is the zeroed embeddings of the default, true)")
    return xl


def load_sd_pipeline(src: str) -> tuple[ml_collections.ConfigDict, nnx.Module]:
    """A diffusers Stable Diffusion 1.x / 2.x pipeline folder -> (config overrides, diffax UNet with its weights).

    The overrides name the whole run: config.model (the UNet), config.data (image_size = the UNet's latent
    side times the VAE's downsampling factor, the VAE's channels), config.autoencoder.path (src/vae),
    config.text (encoder = src/text_encoder, frozen, no pooled vector, no mask in cross-attention),
    config.diffusion and config.sampling (the scheduler, diffusers' default guidance scale 7.5), and a
    fine-tuning learning rate (config.optimizer.learning_rate = 1e-5).
    The VAE, text encoder and tokenizer are checked here (loaded once) so a bad folder fails at import.
    """
    from diffax.models.text.pretrained import load_text_encoder, read_config

    src = os.path.abspath(src)
    xl = check_pipeline(src)
    model_fields, context_dim, latent, model = load_cond_unet(os.path.join(src, "unet"))
    vae = load_vae_checked(os.path.join(src, "vae"))
    if vae["latent_channels"] != latent["channels"]:
        raise UnsupportedDiffusersConfig(f"{src}: the VAE has {vae['latent_channels']} latent channels but the UNet "
                                         f"takes {latent['channels']}")
    text_dir = os.path.join(src, "text_encoder")
    side = latent["image_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    if xl:
        text = sdxl_text_checked(src, context_dim, added_pooled_dim(_read_json(os.path.join(src, "unet", CONFIG_NAME))))
    else:
        load_text_encoder(text_dir)  # its weights and tokenizer are read at every build; checked here once
        text_config = read_config(text_dir)
        width = int((text_config.get("text_config") or text_config).get("hidden_size", 0))
        if width != context_dim:
            raise UnsupportedDiffusersConfig(f"{text_dir} returns {width}-wide text states but the UNet's "
                                             f"cross_attention_dim is {context_dim}")
        text = dict(encoder=text_dir, pooled=False)
    scheduler = scheduler_options(_read_json(os.path.join(src, "scheduler", SCHEDULER_NAME)))
    diffusion, sampling = scheduler_config_to_diffax(scheduler)
    overrides = ml_collections.ConfigDict(dict(
        model=model_fields,
        data=dict(image_size=side, channels=int(vae["in_channels"]), resize="resize",
                  conditional=False),
        autoencoder=dict(path=os.path.join(src, "vae")),
        text=dict(text, mask_context=False, trainable=False),
        diffusion=diffusion,
        sampling=dict(sampling, guidance_scale=5.0 if xl else 7.5),  # the pipelines' defaults
        optimizer=dict(learning_rate=1e-5),  # a fine-tuning rate (diffusers' train_text_to_image examples)
    ))
    return overrides, model


def sdxl_text_checked(src: str, context_dim: int, pooled: int) -> dict[str, Any]:
    """SDXL's two CLIPs checked against the UNet (loaded once here, so a bad folder fails at import); returns the
    config.text fields of the run (diffax/models/text/sdxl.py)."""
    from diffax.models.text.sdxl import load_sdxl_conditioner

    first, second = os.path.join(src, "text_encoder"), os.path.join(src, "text_encoder_2")
    encoder, _ = load_sdxl_conditioner(first, second, (0.0,) * NUM_TIME_IDS)
    if encoder.hidden_size != context_dim:
        raise UnsupportedDiffusersConfig(f"{first} and {second} return {encoder.first.hidden_size} + "
                                         f"{encoder.second.hidden_size} wide text states but the UNet's "
                                         f"cross_attention_dim is {context_dim}")
    if encoder.second.pooled_size != pooled:
        raise UnsupportedDiffusersConfig(f"{second} projects to {encoder.second.pooled_size} but the UNet's "
                                         f"add_embedding takes {pooled} pooled features "
                                         "(projection_class_embeddings_input_dim - 6 x addition_time_embed_dim)")
    return dict(encoder=first, encoder_2=second, pooled=True)


def scheduler_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop the options of other schedulers that a scheduler config carries after diffusers'
    `OtherScheduler.from_config(pipe.scheduler.config)` (e.g. DDIM's clip_sample in an Euler config): the
    class ignores them, so diffax does too. Keys no diffusers scheduler diffax knows has stay, and are errors."""
    from diffax.models.diffusers import SCHEDULER_DEFAULTS

    own = SCHEDULER_DEFAULTS.get(cfg.get("_class_name", ""))
    if own is None:
        return cfg
    known = {k for defaults in SCHEDULER_DEFAULTS.values() for k in defaults} | {"skip_prk_steps"}
    foreign = sorted(k for k in cfg if not k.startswith("_") and k not in own and k in known)
    if foreign:
        log.info("scheduler options %s belong to another scheduler class; %s ignores them", foreign, cfg["_class_name"])
    return {k: v for k, v in cfg.items() if k not in foreign}


def load_vae_checked(vae_dir: str) -> dict[str, Any]:
    """Check that an AutoencoderKL folder's weights match its config (without initialising it); returns the
    keyword arguments of diffax's AutoencoderKL."""
    from diffax.models import diffusers_vae
    from diffax.models.autoencoder import AutoencoderKL

    kwargs, _ = diffusers_vae.autoencoder_config_to_diffax(_read_json(os.path.join(vae_dir, CONFIG_NAME)))
    model = nnx.eval_shape(lambda: AutoencoderKL(**kwargs, rngs=nnx.Rngs(0)))
    weights = os.path.join(vae_dir, WEIGHTS_NAME)
    try:
        load_weights(model, read_weights(weights), source=diffusers_vae._source, what="AutoencoderKL")
    except UnsupportedDiffusersConfig as e:
        config_path = os.path.join(vae_dir, CONFIG_NAME)
        raise UnsupportedDiffusersConfig(f"{weights} does not match {config_path}: {e}") from None
    return kwargs


def load_any(src: str) -> tuple[ml_collections.ConfigDict, nnx.Module]:
    """`diffax import-diffusers --src`: a Stable Diffusion pipeline folder, or a UNet2DModel (pipeline) folder."""
    if not os.path.isdir(src):
        raise UserError(f"--src {src}: no such folder")
    if is_sd_pipeline(src):
        return load_sd_pipeline(src)
    cls = _component_class(src, "unet")
    if cls is not None and cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise UnsupportedDiffusersConfig(f"{os.path.join(src, 'model_index.json')}: unet is a {cls}; diffax imports "
                                         "UNet2DModel and UNet2DConditionModel")
    return load_diffusers_unet(src)


# --------------------------------------------------------------------------- export


def _heads_option(m: Any, widths: list[int], levels: list[int], cls: str) -> Any:
    """diffusers' attention_head_dim for the diffax heads rule (UNet2DModel: channels per head; UNet2DConditionModel:
    heads, per level when head_channels fixes the width)."""
    hc, nh = int(m.head_channels), int(m.num_heads)
    if cls == "UNet2DConditionModel":
        if hc > 0:
            return [w // hc if w % hc == 0 else 1 for w in widths]
        return nh
    if hc > 0:
        return hc
    if nh == 1:
        return None  # one head of all channels at every level
    dims = {widths[i] // nh for i in levels}
    if len(dims) != 1:
        raise UserError(f"config.model.num_heads={nh} gives another head width at each level ({sorted(dims)}); "
                        "diffusers' UNet2DModel has one attention_head_dim. Export needs head_channels > 0.")
    return dims.pop()


def unet_to_diffusers_config(config: Any, data_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The diffusers config.json (UNet2DModel, or UNet2DConditionModel for a text run) of a diffax UNet config;
    data_shape: what the UNet sees (default: the config's images, or latents for a latent run)."""
    from diffax.training import latent as latent_lib
    from diffax.training import text as text_lib

    m = config.model
    if m.name != "unet":
        raise UserError(f"config.model.name={m.name!r}: only UNet runs export to diffusers (UNet2DModel / "
                        "UNet2DConditionModel).")
    if config.data.conditional:
        raise UserError("class-conditional UNets are not exported (diffusers' class embeddings differ); "
                        "export unconditional or text runs.")
    if m.embedding != "sinusoidal":
        raise UserError(f"config.model.embedding={m.embedding!r}: only the sinusoidal embedding exports.")
    h, _, c = data_shape or latent_lib.model_data_shape(config)
    widths = [int(m.channels) * int(x) for x in m.channel_mult]
    n = len(widths)
    down = [h >> i in tuple(m.attention_resolutions) for i in range(n)]
    up_res = tuple(m.attention_resolutions) if m.up_attention_resolutions is None else tuple(m.up_attention_resolutions)
    up = [h >> (n - 1 - i) in up_res for i in range(n)]
    levels = [i for i in range(n) if down[i] or up[n - 1 - i]] + [n - 1]
    common = dict(sample_size=h, in_channels=c, block_out_channels=widths, layers_per_block=int(m.num_res_blocks),
                  downsample_padding=int(m.downsample_padding), dropout=float(m.dropout), act_fn="silu",
                  norm_num_groups=int(m.norm_groups), norm_eps=float(m.norm_eps),
                  flip_sin_to_cos=bool(m.flip_sin_to_cos), freq_shift=float(m.freq_shift),
                  resnet_time_scale_shift="scale_shift" if m.scale_shift_norm else "default")
    if text_lib.enabled(config):
        if m.resblock_updown or m.learn_sigma or not m.mid_attention:
            raise UserError("text UNets export with conv resampling, mid attention and no learned sigma only "
                            "(config.model.resblock_updown / learn_sigma / mid_attention).")
        return dict(
            _class_name="UNet2DConditionModel", **common, out_channels=c,
            down_block_types=[CROSS_DOWN if a else "DownBlock2D" for a in down],
            up_block_types=[CROSS_UP if a else "UpBlock2D" for a in up],
            mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=None,  # filled in by the caller
            attention_head_dim=_heads_option(m, widths, levels, "UNet2DConditionModel"),
            transformer_layers_per_block=([int(d) for d in m.transformer_depths] if m.get("transformer_depths")
                                          else int(m.transformer_depth)),
            use_linear_projection=bool(m.use_linear_projection))
    resample = "resnet" if m.resblock_updown else "conv"
    plain_down, plain_up = "DownBlock2D", "UpBlock2D"
    resnet_down = "ResnetDownsampleBlock2D" if m.resblock_updown else plain_down
    resnet_up = "ResnetUpsampleBlock2D" if m.resblock_updown else plain_up
    return dict(
        _class_name="UNet2DModel", **common, out_channels=c * (2 if m.learn_sigma else 1),
        down_block_types=[f"Attn{plain_down}" if a else resnet_down for a in down],
        up_block_types=[f"Attn{plain_up}" if a else resnet_up for a in up],
        mid_block_type="UNetMidBlock2D", add_attention=bool(m.mid_attention), downsample_type=resample,
        upsample_type=resample, attention_head_dim=_heads_option(m, widths, levels, "UNet2DModel"),
        attn_norm_num_groups=int(m.norm_groups) if m.scale_shift_norm else None, time_embedding_type="positional",
        center_input_sample=False, mid_block_scale_factor=1)


_SCHEDULE_BETAS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
                   "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}
_SAMPLER_CLASSES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
                    "heun": "HeunDiscreteScheduler", "dpm_solver": "DPMSolverMultistepScheduler"}


def scheduler_to_diffusers_config(config: Any) -> dict[str, Any]:
    """The scheduler_config.json of a run's discrete VP schedule and sampler (the inverse of
    scheduler_config_to_diffax for DDPM / DDIM / PNDM / Euler / Heun / DPM-Solver++ on linear, scaled_linear, cosine)."""
    d, s = config.diffusion, config.sampling
    if int(d.num_steps) <= 0 or d.schedule not in _SCHEDULE_BETAS:
        raise UserError(f"config.diffusion.schedule={d.schedule!r} with num_steps={d.num_steps}: diffusers' "
                        f"schedulers take a discrete {' / '.join(_SCHEDULE_BETAS)} schedule; export the UNet alone "
                        "is not offered for other schedules.")
    predictions = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
    if d.prediction not in predictions:
        raise UserError(f"config.diffusion.prediction={d.prediction!r} has no diffusers prediction_type "
                        f"({', '.join(predictions)}).")
    cls = _SAMPLER_CLASSES.get(str(s.sampler), "DDPMScheduler")
    beta_schedule, start, end = _SCHEDULE_BETAS[str(d.schedule)]
    out = dict(_class_name=cls, num_train_timesteps=int(d.num_steps), beta_schedule=beta_schedule, beta_start=start,
               beta_end=end, prediction_type=predictions[str(d.prediction)],
               rescale_betas_zero_snr=bool(d.zero_terminal_snr), timestep_spacing=str(s.spacing),
               steps_offset=int(s.steps_offset))
    if cls in ("DDIMScheduler", "DDPMScheduler"):
        out.update(clip_sample=bool(d.clip_x0), thresholding=float(d.dynamic_threshold) > 0,
                   dynamic_thresholding_ratio=float(d.dynamic_threshold) or 0.995)
    if cls in ("DDIMScheduler", "PNDMScheduler"):
        out["set_alpha_to_one"] = bool(s.final_alpha_one)
    if cls == "PNDMScheduler":
        if bool(d.zero_terminal_snr) or d.prediction == "x0":
            raise UserError("config.sampling.sampler='pndm': diffusers' PNDMScheduler has no rescale_betas_zero_snr "
                            "and no x0 prediction; set config.sampling.sampler=ddim before exporting.")
        del out["rescale_betas_zero_snr"]
        out["skip_prk_steps"] = bool(s.get("skip_prk_steps", True))
    if cls == "DDPMScheduler":
        variances = {"small": "fixed_small", "large": "fixed_large", "learned": "learned_range"}
        out["variance_type"] = variances[str(s.variance)]
    if cls in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"):
        out["use_karras_sigmas"] = str(s.grid) == "diffusers_karras"
    if cls == "DPMSolverMultistepScheduler":
        algorithm = "sde-dpmsolver++" if s.solver_type == "sde" else "dpmsolver++"
        out.update(solver_order=int(s.order), algorithm_type=algorithm)
    return out


def export_unet(model: nnx.Module, config: Any, output: str, *, context_dim: int = 0,
                data_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Write `model` (a diffax UNet of `config`) as a diffusers unet/ folder and the run's scheduler as scheduler/;
    returns the UNet config.json written."""
    from safetensors.numpy import save_file

    xl = bool(getattr(model, "time_ids_dim", 0))  # SDXL: pooled text and time ids through add_embedding
    if getattr(model, "pooled_embed", None) is not None and not xl:
        raise UserError("this UNet adds a pooled text vector to its timestep embedding (config.text.pooled=True) "
                        "without SDXL's time ids, which UNet2DConditionModel has no place for; export runs trained "
                        "with config.text.pooled=False, or SDXL runs.")
    cfg = unet_to_diffusers_config(config, data_shape)
    if xl:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=int(model.time_ids_dim),
                   projection_class_embeddings_input_dim=int(model.pooled_embed.linear_1.kernel.shape[0]))
    if cfg["_class_name"] == "UNet2DConditionModel":
        cfg["cross_attention_dim"] = int(context_dim)
        source = _cond_source_for(dict(use_linear_projection=bool(config.model.use_linear_projection)))
    else:
        source = _source
    tensors = model_tensors(model, source)
    unet_dir = os.path.join(output, "unet")
    os.makedirs(unet_dir, exist_ok=True)
    save_file(tensors, os.path.join(unet_dir, WEIGHTS_NAME))
    with open(os.path.join(unet_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    os.makedirs(os.path.join(output, "scheduler"), exist_ok=True)
    with open(os.path.join(output, "scheduler", SCHEDULER_NAME), "w", encoding="utf-8") as f:
        json.dump(scheduler_to_diffusers_config(config), f, indent=2)
    return cfg
