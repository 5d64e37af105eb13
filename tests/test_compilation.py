"""diffax.compilation: the XLA options diffax compiles with, and that they do what they claim."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffax import compilation
from diffax.models.layers import conv2d

cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are for XLA:CPU")


def _conv_grad_hlo(options):
    """The optimised HLO of a 32-channel 3x3 conv's gradient compiled with `options` (XLA:CPU leaves
    convolutions with fewer channels to Eigen in any case)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 32)), jnp.float32)
    k = jnp.zeros((3, 3, 32, 32), jnp.float32)
    loss = lambda k, x: jnp.sum(conv2d(x, k, padding=((1, 1), (1, 1))) ** 2)  # noqa: E731
    grad = jax.jit(jax.grad(loss), compiler_options=options)
    return grad.lower(k, x).compile().as_text()


@cpu_only
def test_cpu_default_turns_ynnpack_off_and_the_config_turns_it_back_on():
    config = ml_collections.ConfigDict({"xla_cpu_ynnpack": False})
    assert compilation.compiler_options(config) == compilation.CPU_WITHOUT_YNNPACK
    config.xla_cpu_ynnpack = True
    assert compilation.compiler_options(config) is None
    # a config written before the field existed gets the default
    assert compilation.compiler_options(ml_collections.ConfigDict({})) == compilation.CPU_WITHOUT_YNNPACK


@cpu_only
def test_the_option_removes_ynnpack_convolutions_from_the_compiled_program():
    # if a jaxlib stops running convolutions through YNNPACK, this fails and the option should be revisited
    assert "ynn_fusion" in _conv_grad_hlo(None)
    assert "ynn_fusion" not in _conv_grad_hlo(compilation.CPU_WITHOUT_YNNPACK)


def test_an_option_this_jaxlib_rejects_falls_back_to_xla_defaults():
    assert compilation._accepted((("xla_diffax_no_such_option", True),)) is False
    assert compilation._accepted(()) is True
