"""LoRA (Hu et al. 2022) on the attention projections of the SD UNet: the adapted network starts equal to the base,
the merged weights compute what the side branch x W + (alpha / r) x A B computes, only the adapters train (the base
is bitwise unchanged, the optimizer holds state for the adapters only), the loss falls, a checkpoint restores the
exact state, and `diffax export-lora` / `export-diffusers` write the adapters in PEFT naming / merged.

Fixture: the tiny SD 1.x pipeline of tests/fixtures/make_sd_pipeline_fixture.py.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffax.models import lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline", "pipeline")
TARGETS = ("to_q", "to_k", "to_v", "to_out")
CAPTIONS = ["a red square", "a blue circle", "a green line", "a dark spot"]


@pytest.fixture(scope="module")
def unet():
    from diffax.models.diffusers_sd import load_cond_unet

    return load_cond_unet(os.path.join(PIPELINE, "unet"))[-1]


def _inputs():
    rs = np.random.RandomState(0)
    return (jnp.asarray(rs.randn(2, 8, 8, 4), jnp.float32), jnp.asarray([17.0, 700.0]),
            jnp.asarray(rs.randn(2, 5, 32), jnp.float32))


class _Branch(nnx.Module):
    """The unmerged LoRA layer: base(x) + scale (x A) B (Hu et al. 2022, Eq. 3)."""

    def __init__(self, base, a, b, scale):
        self.base, self.a, self.b, self.scale = base, nnx.Variable(a), nnx.Variable(b), scale

    def __call__(self, x):
        return self.base(x) + self.scale * ((x @ self.a[...]) @ self.b[...])


def test_adapters_start_at_zero_and_merge_equals_the_side_branch(unet):
    graphdef, params, rest = nnx.split(unet, nnx.Param, ...)
    adapters = lora.init(unet, TARGETS, 4, jax.random.key(0))
    assert len(lora.adapters(adapters)) == 32  # 4 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out)
    x, t, c = _inputs()
    run = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p, rest)(x, t, context=c))
    base = np.asarray(run(params, x, t, c))
    # B = 0: the adapted network is the base network, bit for bit
    np.testing.assert_array_equal(np.asarray(run(lora.merge(params, adapters, 2.0), x, t, c)), base)

    # with B != 0: the merged weights compute the unmerged side branch (float32 rounding only)
    flat = {k: {"a": v["a"], "b": 0.3 * jax.random.normal(jax.random.key(len(k) + i), v["b"].shape)}
            for i, (k, v) in enumerate(lora.adapters(adapters).items())}
    nested = {}
    for k, v in flat.items():
        node = nested
        for part in k[:-1]:
            node = node.setdefault(part, {})
        node[k[-1]] = v
    merged = np.asarray(run(lora.merge(params, nested, 2.0), x, t, c))
    branch = nnx.merge(graphdef, params, rest)
    for path in lora.target_layers(branch, TARGETS):
        parent = branch
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        ab = flat[tuple(str(p) for p in path)]
        setattr(parent, path[-1], _Branch(getattr(parent, path[-1]), ab["a"], ab["b"], 2.0))
    unmerged = np.asarray(nnx.jit(lambda m, x, t, c: m(x, t, context=c))(branch, x, t, c))
    assert np.abs(merged - base).max() > 1e-2  # the adapters change the output
    np.testing.assert_allclose(merged, unmerged, atol=2e-5 * np.abs(unmerged).max(), rtol=0)


class _Tiny(nnx.Module):
    def __init__(self):
        self.to_q = nnx.Linear(6, 5, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.to_q(x)


def test_dropout_branch_is_the_side_branch_on_a_dropped_input():
    """add_branches (config.lora.dropout): rate 0 computes the merged layer; rate 0.5 drops about half the
    branch's inputs, differently per key, and is unbiased (inverted dropout): over 4000 keys the mean update is
    scale x A B within 5 standard errors, while the base path x W + b is untouched by the mask."""
    graphdef, params, rest = nnx.split(_Tiny(), nnx.Param, ...)
    adapters = lora.init(_Tiny(), ("to_q",), 3, jax.random.key(1))
    adapters["to_q"]["b"] = jax.random.normal(jax.random.key(2), (3, 5))
    x = jax.random.normal(jax.random.key(3), (4, 6))
    scale = 2.0

    def branch(rate, key):
        model = nnx.merge(graphdef, params, rest)
        lora.add_branches(model, adapters, scale, rate, key)
        return model(x)

    merged = nnx.merge(graphdef, lora.merge(params, adapters, scale), rest)(x)
    np.testing.assert_allclose(branch(0.0, jax.random.key(0)), merged, atol=1e-5)
    base = nnx.merge(graphdef, params, rest)(x)
    updates = jax.vmap(lambda k: branch(0.5, k) - base)(jax.random.split(jax.random.key(4), 4000))
    assert not np.allclose(updates[0], updates[1])
    expected = scale * (x @ adapters["to_q"]["a"]) @ adapters["to_q"]["b"]
    sem = np.std(np.asarray(updates), axis=0) / np.sqrt(len(updates))
    assert np.all(np.abs(np.mean(np.asarray(updates), axis=0) - expected) < 5 * sem + 1e-6)
    assert np.abs(np.mean(np.asarray(updates), axis=0) - expected).max() < 0.1 * np.abs(expected).max()
    with pytest.raises(ValueError, match="config.lora.dropout=1.0"):
        lora.dropout_of(dict(dropout=1.0))


def test_unknown_target_is_an_error(unet):
    with pytest.raises(ValueError, match="config.lora.targets=.*to_x"):
        lora.init(unet, ("to_x",), 4, jax.random.key(0))


# ----------------------------------------------------------------------------- training the adapters


def sd_diffusion(rank: int = 4, dropout: float = 0.0):
    """The imported pipeline (its config, UNet weights and CLIP) with LoRA on its attention projections and a
    fast learning rate, as `diffax import-diffusers --config.lora.rank=4` sets it up."""
    from configs.default import get_config
    from diffax.models.diffusers_sd import load_sd_pipeline
    from diffax.training.build import build
    from diffax.training.importing import merge

    config = get_config()
    overrides, unet = load_sd_pipeline(PIPELINE)
    merge(config, overrides)
    config.lora.rank, config.lora.alpha, config.lora.dropout = rank, 8.0, dropout
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-2, 0
    config.training.batch_size = 4
    diffusion = build(config)
    diffusion.params = {**diffusion.params, "net": nnx.split(unet, nnx.Param, ...)[1]}
    return config, diffusion


def latent_batch(diffusion):
    """Fixed latents [4, 8, 8, 4] and the captions' tokens, as the train step receives them."""
    from diffax.training import text

    rs = np.random.RandomState(0)
    return {"image": jnp.asarray(rs.randn(4, 8, 8, 4), jnp.float32),
            "tokens": jnp.asarray(text.tokens_of(diffusion.tokenizer, CAPTIONS))}


@pytest.mark.slow  # four compiles of the SD UNet (two sampling, the train forward, its gradient): ~80 s on 2 cores
def test_lora_dropout_acts_in_training_only():
    """With config.lora.dropout the train step's network (a dropout key given) runs the side branches with dropped
    inputs, and its gradient reaches the adapters only; sampling's (no key) is the merged network, as without
    dropout."""
    _, diffusion = sd_diffusion(dropout=0.3)
    _, plain = sd_diffusion(dropout=0.0)
    flat = lora.adapters(diffusion.params["lora"])
    for i, ab in enumerate(flat.values()):
        ab["b"] = 0.3 * jax.random.normal(jax.random.key(i), ab["b"].shape)
    params = diffusion.params
    batch = latent_batch(diffusion)
    c_noise = jnp.asarray([17.0, 700.0, 300.0, 5.0])

    def out(d, p, key):
        return d.apply_fn(p, key)(batch["image"], c_noise, batch["tokens"])

    sampling = np.asarray(jax.jit(lambda p: out(diffusion, p, None))(params))
    np.testing.assert_array_equal(sampling, np.asarray(jax.jit(lambda p: out(plain, p, None))(params)))
    train = jax.jit(lambda p, k: out(diffusion, p, k))
    a, b = np.asarray(train(params, jax.random.key(0))), np.asarray(train(params, jax.random.key(1)))
    assert np.abs(a - sampling).max() > 1e-3 and np.abs(a - b).max() > 1e-3  # the masks act, per key
    grads = jax.jit(jax.grad(lambda p: jnp.mean(out(diffusion, p, jax.random.key(0)) ** 2)))(params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["net"]))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["lora"]))


def fine_tune(dropout: float = 0.0):
    """30 LoRA train steps on one fixed batch, each with step 0's noise and times (the state's step is reset before
    each), so the loss of one fixed problem is followed as the adapters fit it (the text encoder and UNet frozen)."""
    from diffax import parallel
    from diffax.training.state import learning_rate_schedule
    from diffax.training.step import init_state, make_train_step, state_layout

    config, diffusion = sd_diffusion(dropout=dropout)
    tx, abstract, shardings = state_layout(diffusion, config, parallel.make_mesh(config.mesh))
    state0 = init_state(diffusion, tx)
    step = jax.jit(make_train_step(diffusion, tx, learning_rate_schedule(config.optimizer, 100), config))
    batch = latent_batch(diffusion)
    state, losses = state0, []
    for _ in range(30):
        state, metrics = step(state.replace(step=jnp.zeros_like(state.step)), batch)
        losses.append(float(metrics["loss"]))
    return dict(config=config, diffusion=diffusion, state0=state0, state=state, losses=losses, step=step,
                batch=batch, abstract=abstract, shardings=shardings)


@pytest.fixture(scope="module")
def trained():
    return fine_tune()


@pytest.mark.slow  # a 30-step fine-tune: ~50 s on 2 cores
def test_only_the_adapters_train(trained):
    state0, state = trained["state0"], trained["state"]
    for name in ("net", "text", "schedule"):  # the base: bitwise unchanged
        same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), state0.params[name],
                            state.params[name])
        assert all(jax.tree.leaves(same)), name
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora.adapters(state0.params["lora"])),
                                                         jax.tree.leaves(lora.adapters(state.params["lora"])))]
    assert all(changed)
    # the optimizer's moments exist for the adapters only: Adam's mu and nu, each the adapters' size
    n_lora = sum(x.size for x in jax.tree.leaves(state.params["lora"]))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_lora


@pytest.mark.slow  # the 30-step fine-tune fixture: ~40 s on 2 cores
def test_lora_loss_falls(trained):
    """The loss of the fixed batch, noise and times (each step's loss is before its update) falls as only the
    adapters learn."""
    losses = trained["losses"]
    assert np.isfinite(losses).all()
    print("LoRA loss on the fixed problem:", losses[0], "->", losses[-1])
    assert losses[-1] < 0.95 * losses[0], losses  # measured: 0.987 -> 0.886 (lr 3e-2, rank 4, alpha 8)


@pytest.mark.slow  # a second 30-step fine-tune: ~50 s on 2 cores
def test_lora_with_dropout_learns():
    """The same fixed problem with config.lora.dropout=0.1: the loss still falls (each step's masks are those of
    step 0's key, as its noise is)."""
    losses = fine_tune(dropout=0.1)["losses"]
    print("LoRA loss with dropout 0.1:", losses[0], "->", losses[-1])
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.slow  # an import or a second train-step compile: ~40-70 s on 2 busy cores
def test_checkpoint_restores_the_lora_state_exactly(trained, tmp_path):
    """Save, restore with the run's layout, take the same next step: bit-identical states (exact resume)."""
    from diffax.training import checkpoint

    ckpt = checkpoint.Checkpointer(str(tmp_path), 2, async_save=False)
    try:
        ckpt.save(30, trained["state"])
        ckpt.wait()
        restored = ckpt.restore(30, checkpoint.abstract_like(trained["abstract"], trained["shardings"]))
    finally:
        ckpt.close()
    a, _ = trained["step"](trained["state"], trained["batch"])
    b, _ = trained["step"](restored, trained["batch"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- import and export


@pytest.fixture(scope="module")
def lora_workdir(tmp_path_factory):
    """`diffax import-diffusers --config.lora.rank=4`: the step-0 checkpoint holds the adapters."""
    from configs.default import get_config
    from diffax.training import importing

    config = get_config()
    config.lora.rank = 4
    path = str(tmp_path_factory.mktemp("lora") / "run")
    importing.import_diffusers(PIPELINE, path, config)
    return path


@pytest.mark.slow  # an import or a second train-step compile: ~40-70 s on 2 busy cores
def test_export_lora_writes_peft_names(lora_workdir, tmp_path):
    """Every adapter is named after a diffusers UNet linear layer (unet.<module>.lora_A / lora_B.weight) with
    PEFT's shapes lora_A [r, in], lora_B [out, r] against that layer's [out, in] weight."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file

    from diffax.training import importing

    out = str(tmp_path / "lora.safetensors")
    info = importing.export_lora(lora_workdir, out)
    assert info == dict(step=0, tensors=64, rank=4)
    got = load_file(out)
    unet = load_file(os.path.join(PIPELINE, "unet", "diffusion_pytorch_model.safetensors"))
    for name, value in got.items():
        assert name.startswith("unet.") and name.endswith((".lora_A.weight", ".lora_B.weight")), name
        module = name[len("unet."):].rsplit(".", 2)[0]
        weight = unet[module + ".weight"]
        assert value.shape == ((4, weight.shape[1]) if ".lora_A." in name else (weight.shape[0], 4)), name
        if ".lora_B." in name:
            assert not value.any()  # B starts at zero
    modules = {n[len("unet."):].rsplit(".", 2)[0] for n in got}
    assert {m for m in unet if ".attn" in m and m.endswith(("to_q.weight", "to_out.0.weight"))} == {
        m + ".weight" for m in modules if m.endswith(("to_q", "to_out.0"))}
    with safe_open(out, "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta == {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": ["to_k", "to_out.0", "to_q", "to_v"]}


@pytest.mark.slow  # an import or a second train-step compile: ~40-70 s on 2 busy cores
def test_export_lora_of_a_run_without_lora_is_an_error(tmp_path):
    from configs.default import get_config
    from diffax.errors import UserError
    from diffax.training import importing

    workdir = str(tmp_path / "plain")
    importing.import_diffusers(PIPELINE, workdir, get_config())
    with pytest.raises(UserError, match="not a LoRA run"):
        importing.export_lora(workdir, str(tmp_path / "x.safetensors"))
