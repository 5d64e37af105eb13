"""benchmarks/torch_parity.py and benchmarks/parity_profile.py: the diffax side on imported weights,
the per-round ratios, the profile's categories. The PyTorch side runs only in the slow test, and only
where a torch venv is found (tests never import torch)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from benchmarks import parity_profile, torch_parity
from diffax import compilation
from diffax.models import layers

DDPM = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers_unet", "ddpm")


@pytest.fixture(scope="module")
def side():
    # quick to compile: the benchmark's own runs use diffax's options (diffax/compilation.py)
    return torch_parity.DiffaxSide(DDPM, batch=2, steps=2, compiler_options={"xla_backend_optimization_level": 0})


@pytest.mark.slow  # a UNet train step and sampler compiled: ~1-3 min on 2 busy cores
def test_diffax_side_trains_and_samples_the_imported_weights(side):
    tensors = load_file(os.path.join(DDPM, "diffusion_pytorch_model.safetensors"))
    params = side.bench.state.params["net"]
    # the same weights as the PyTorch side: conv_in's OIHW kernel is diffax's HWIO kernel
    np.testing.assert_array_equal(np.asarray(params["conv_in"]["kernel"][...]),
                                  tensors["conv_in.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(side.bench.state.ema["net"]["conv_in"]["kernel"][...]),
                                  tensors["conv_in.weight"].transpose(2, 3, 1, 0))
    side.train()
    assert int(side.bench.state.step) == 1
    assert not np.array_equal(np.asarray(side.bench.state.params["net"]["conv_in"]["kernel"][...]),
                              tensors["conv_in.weight"].transpose(2, 3, 1, 0))  # Adam moved the weights
    assert side.compile_s > 0
    side.sample()


def test_ratios_are_formed_within_rounds_and_the_order_alternates():
    calls, seconds = [], iter([2.0, 3.0, 4.0, 5.0, 6.0])

    def ours():
        calls.append("diffax")

    def theirs():
        calls.append("torch")
        return next(seconds)

    r = torch_parity.interleaved_ratios(ours, theirs, rounds=4)
    assert calls == ["diffax", "torch"] + ["diffax", "torch", "torch", "diffax"] * 2  # warm-up, then alternating
    assert r["torch_s"] == [3.0, 4.0, 5.0, 6.0]
    assert r["ratios"] == [t / d for t, d in zip(r["torch_s"], r["diffax_s"])]
    assert r["ratio"] == pytest.approx(np.median(r["ratios"]))


def test_profile_puts_each_instruction_in_its_category():
    norm = layers.GroupNorm(16, 4)
    tx = optax.adam(1e-3)

    def step(k, opt, x):
        def loss(k):
            return jnp.mean(norm(layers.conv2d(x, k, padding=((1, 1), (1, 1)))) ** 2)

        g = jax.grad(loss)(k)
        u, opt = tx.update(g, opt, k)
        return optax.apply_updates(k, u), opt

    k = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8))
    opt = tx.init(k)
    compiled = jax.jit(step, compiler_options=compilation.compiler_options({})).lower(k, opt, x).compile()
    cats = parity_profile.hlo_categories(compiled.as_text())
    assert {"conv fwd", "conv bwd", "GroupNorm fwd", "GroupNorm bwd", "optimizer + EMA"} <= set(cats.values())
    ms = parity_profile.jax_profile(lambda: jax.block_until_ready(compiled(k, opt, x)), compiled.as_text())
    assert ms.get("conv fwd", 0) > 0 and ms.get("conv bwd", 0) > 0


def test_torch_op_categories():
    c = parity_profile.torch_category
    assert c("aten::convolution_backward") == "conv bwd" and c("aten::mkldnn_convolution") == "conv fwd"
    assert c("aten::native_group_norm_backward") == "GroupNorm bwd" and c("aten::native_group_norm") == "GroupNorm fwd"
    assert c("aten::_foreach_lerp_") == "optimizer + EMA" and c("Optimizer.step#Adam.step") == "optimizer + EMA"
    assert c("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert c("ConvolutionBackward0") is None  # an autograd node: its ops are counted themselves


@pytest.mark.slow
@pytest.mark.skipif(torch_parity.torch_python() is None, reason="no PyTorch venv (DIFFAX_TORCH_PYTHON)")
def test_small_benchmark_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    r = torch_parity.main(["--small", "--batches", "2", "--train-rounds", "1", "--sample-rounds", "1",
                           "--steps", "2", "--output", str(out)])
    assert [row["what"] for row in r["rows"]] == ["train step", "DDIM-2 sampling"]
    for row in r["rows"]:
        assert row["ratio"] == pytest.approx(row["torch_s"][0] / row["diffax_s"][0])
    assert out.exists()
