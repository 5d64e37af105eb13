"""Build what a config names (network, schedule, parameterization) once, for training and inference alike."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from diffax import models, parameterization, schedules
from diffax.models import lora as lora_lib
from diffax.training import latent
from diffax.training import text as text_lib


@dataclasses.dataclass
class Diffusion:
    """A config's denoiser split into pure parts.

    `params` is {"net": network weights, "schedule": learned-schedule weights
    (empty unless config.diffusion.schedule is "learned")}. `apply_fn(params)`
    and `schedule(params)` rebuild the callables inside a jitted function.
    """

    config: Any
    data_shape: tuple[int, ...]
    num_classes: int
    net_graphdef: Any
    net_rest: Any  # non-trainable network state (usually empty)
    schedule_graphdef: Any  # None when the schedule has no weights
    static_schedule: Any  # the schedule when it has no weights
    parameterization: Any
    params: Any  # initial weights
    text_graphdef: Any = None  # text models: the text encoder (its weights are params["text"], or frozen_text)
    text_rest: Any = None
    text_trainable: bool = False  # False: the encoder is frozen (no gradient, no update)
    pooled: bool = False  # the network takes the pooled text vector
    null_tokens: Any = None  # text models: int32 [2, max_length], the empty prompt (the null condition)
    tokenizer: Any = None  # a pretrained encoder's own tokenizer (the small one's lives in the workdir)
    mask_context: bool = True  # hide padding from the network's cross-attention (config.text.mask_context)
    # A run on cached text embeddings (diffax/data/latents.py): the frozen encoder's weights stay out of
    # params (so out of the train step, the optimizer, the EMA and the checkpoints); sampling passes them
    # back in through `sampling_params`. None for every other run.
    frozen_text: Any = None
    null_embedding: Any = None  # ... and the empty prompt's embedding stored in the cache (caption dropout's null)
    lora_scale: float = 0.0  # alpha / rank of params["lora"], the LoRA adapters (diffax/models/lora.py)
    lora_dropout: float = 0.0  # dropout on the adapters' input in training (their side-branch form)

    def encode_text(self, params: Any, tokens: jax.Array) -> dict:
        """A text condition: tokens [B, 2, L] (ids, mask) -> {"hidden" [B, L, D], "mask" [B, L], "pooled" [B, P]
        (when the encoder has one)}, the encoder run once on the batch (under the name scope
        "text_encoder", which tests look for in a sampler's program)."""
        text_params = params["text"] if self.text_trainable else jax.lax.stop_gradient(params["text"])
        encoder = nnx.merge(self.text_graphdef, text_params, self.text_rest)
        ids, mask = tokens[:, 0], tokens[:, 1]
        with jax.named_scope("text_encoder"):
            emb = encoder(ids, mask)
        out = {"hidden": emb.hidden, "mask": mask[:, :emb.hidden.shape[1]]}  # SDXL's pair of tokenizers: 2L ids
        if emb.pooled is not None:
            out["pooled"] = emb.pooled
        return out

    def net_params(self, params: Any) -> Any:
        """The network's weights: params["net"], or with LoRA the frozen base plus the adapters merged in."""
        if "lora" not in params:
            return params["net"]
        return lora_lib.merge(jax.lax.stop_gradient(params["net"]), params["lora"], self.lora_scale)

    def apply_fn(self, params: Any, dropout_key: jax.Array | None = None) -> Callable:
        """The network as apply_fn(z_in, c_noise, labels) for the diffusion math.

        For a text model `labels` is a text condition: `encode_text`'s dict of embeddings (what the train
        step and the samplers pass: the encoder has run once, outside the network evaluations), or
        tokens [B, 2, L], which are encoded here at every call. It reaches the network as context /
        context_mask / pooled keyword arguments.
        """
        if self.lora_dropout and dropout_key is not None and "lora" in params:  # training with LoRA dropout
            net = nnx.merge(self.net_graphdef, jax.lax.stop_gradient(params["net"]), self.net_rest)
            dropout_key, lora_key = jax.random.split(dropout_key)
            lora_lib.add_branches(net, params["lora"], self.lora_scale, self.lora_dropout, lora_key)
        else:
            net = nnx.merge(self.net_graphdef, self.net_params(params), self.net_rest)
        if self.text_graphdef is None:
            def apply(z_in, c_noise, labels=None):
                return net(z_in, c_noise, labels, dropout_key=dropout_key)

            return apply

        def apply_text(z_in, c_noise, cond=None):
            if cond is None:
                raise ValueError("a text model needs a text condition (the empty prompt's for unconditional samples)")
            if not isinstance(cond, dict):
                cond = self.encode_text(params, cond)
            return net(z_in, c_noise, None, context=cond["hidden"],
                       context_mask=cond["mask"] if self.mask_context else None,
                       pooled=cond["pooled"] if self.pooled else None, dropout_key=dropout_key)

        return apply_text

    def sampling_params(self, params: Any) -> Any:
        """The weights a sampler needs: `params`, with the frozen encoder's put back for a run on cached
        text embeddings (its prompts are encoded by the encoder all the same)."""
        if self.frozen_text is None:
            return params
        return {**params, "text": self.frozen_text}

    def schedule(self, params: Any) -> Any:
        if self.schedule_graphdef is None:
            return self.static_schedule
        return nnx.merge(self.schedule_graphdef, params["schedule"])

    @property
    def null_label(self) -> Any:
        """The null condition of guidance: the null class, or a text model's empty-prompt tokens."""
        if self.null_tokens is not None:
            return self.null_tokens
        return self.num_classes if self.num_classes else None


def num_classes(config: Any) -> int:
    return int(config.data.num_classes) if config.data.conditional else 0


def build(config: Any, seed: int | None = None, *, cached_text: bool | None = None) -> Diffusion:
    """Initialise the network (and learned schedule) of `config` with `seed` (default config.seed).

    A text run on a latent cache with stored embeddings of its (frozen) encoder keeps the encoder's
    weights out of params, in `frozen_text`: `cached_text`, or when None whether config's data are such a
    cache (`text.cached_embeddings`; a trained run's workdir says, `text.trained_on_cached_embeddings`).
    """
    seed = config.seed if seed is None else seed
    shape = tuple(latent.model_data_shape(config))  # latents when an autoencoder encodes images on the fly
    n_classes = num_classes(config)
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1))
    text = build_text(config, seed) if text_lib.enabled(config) else {}
    extra = {k: text.pop(k) for k in ("context_dim", "pooled_dim") if k in text}
    net = models.build_model(config.model, data_shape=shape, num_classes=n_classes, rngs=rngs, **extra)
    net_graphdef, net_params, net_rest = nnx.split(net, nnx.Param, ...)
    text_params = text.pop("params", {})
    frozen_text = None
    cache = text_lib.cached_embeddings(config) if text else ""
    if text and (cached_text if cached_text is not None else bool(cache)):  # the data bring the embeddings
        frozen_text = jax.tree.map(np.asarray, text_params)  # kept on the host, for sampling only
        from diffax.data.latents import read_null_embedding

        text = {**text, "frozen_text": frozen_text, "null_embedding": read_null_embedding(cache) if cache else None}
    lora = {}
    if lora_lib.enabled(config):  # adapters for the named linear layers; the base weights stay frozen
        key = jax.random.fold_in(jax.random.key(seed), 5)
        lora = dict(lora=lora_lib.init(net, tuple(config.lora.targets), int(config.lora.rank), key),
                    lora_scale=lora_lib.scale_of(config.lora), lora_dropout=lora_lib.dropout_of(config.lora))

    image_size = shape[0] if len(shape) == 3 else None
    schedule = schedules.get_schedule(config.diffusion, image_size=image_size, seed=seed)
    if isinstance(schedule, nnx.Module):
        schedule_graphdef, schedule_params = nnx.split(schedule, nnx.Param)
        static_schedule = None
    else:
        schedule_graphdef, schedule_params, static_schedule = None, {}, schedule
    return Diffusion(
        config=config,
        data_shape=shape,
        num_classes=n_classes,
        net_graphdef=net_graphdef,
        net_rest=net_rest,
        schedule_graphdef=schedule_graphdef,
        static_schedule=static_schedule,
        parameterization=parameterization.get_parameterization(config.diffusion),
        params={"net": net_params, "schedule": schedule_params,
                **({"text": text_params} if text and frozen_text is None else {}),
                **({"lora": lora["lora"]} if lora else {})},
        lora_scale=lora.get("lora_scale", 0.0),
        lora_dropout=lora.get("lora_dropout", 0.0),
        **text,
    )


def build_text(config: Any, seed: int) -> dict:
    """The text encoder of config.text (Diffusion fields, and the network's context_dim / pooled_dim)."""
    import jax.numpy as jnp

    from diffax.models import text as text_models

    t = config.text
    if n_classes := num_classes(config):
        raise ValueError(f"config.text.encoder={t.encoder!r} and config.data.conditional=True ({n_classes} classes): "
                         "a model is conditioned on text or on class labels, not both; set one of them off.")
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 3))
    if t.get("encoder_2", ""):  # SDXL: two CLIPs and the micro-conditioning (diffax/models/text/sdxl.py)
        from diffax.models.text import sdxl

        encoder, tokenizer = sdxl.load_sdxl_conditioner(
            str(t.encoder), str(t.encoder_2), sdxl.time_ids_of(t, int(config.data.image_size)))
        null_tokens = tokenizer.null()  # force_zeros_for_empty_prompt
    else:
        encoder, tokenizer = text_models.make_encoder(
            str(t.encoder), vocab_size=int(t.vocab_size), max_length=int(t.max_length), width=int(t.width),
            depth=int(t.depth), heads=int(t.heads), rngs=rngs)
        null = (tokenizer or text_models.WordTokenizer(text_models.small.SPECIALS, int(t.max_length)))
        null_tokens = text_lib.tokens_of(null, [""])[0]
    probe = jnp.asarray(null_tokens[None])
    emb = jax.eval_shape(lambda: encoder(probe[:, 0], probe[:, 1]))
    pooled = bool(t.pooled) and emb.pooled is not None
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    trainable = str(t.encoder) == "small" or bool(t.trainable)
    return dict(text_graphdef=graphdef, text_rest=rest, text_trainable=trainable, pooled=pooled,
                null_tokens=np.asarray(null_tokens), tokenizer=tokenizer, params=params,
                mask_context=bool(t.get("mask_context", True)),
                context_dim=int(emb.hidden.shape[-1]), pooled_dim=int(emb.pooled.shape[-1]) if pooled else 0)
