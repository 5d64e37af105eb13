"""XLA compiler options for diffax's jitted programs: the one place that sets backend flags.

On XLA:CPU, jaxlib 0.10 hands convolutions to YNNPACK. YNNPACK runs a convolution's kernel
gradient (a convolution whose window is the whole feature map and whose contracted dimension
is only the batch) about 2x slower than XLA's own Eigen convolution, and the backward pass
dominates a train step (benchmarks/models.py measures it). So on the CPU diffax compiles
the train step and the samplers with YNNPACK fusions off, unless `config.xla_cpu_ynnpack`
is True. A jaxlib that no longer knows the option falls back to its defaults with a warning.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
from absl import logging

# Empty list of YNNPACK fusion types: XLA:CPU's own kernels (Eigen) for convolutions and dots.
CPU_WITHOUT_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(config: Any) -> dict[str, Any] | None:
    """Per-jit `compiler_options` for this backend and config (None: XLA's defaults)."""
    if jax.default_backend() != "cpu" or bool(config.get("xla_cpu_ynnpack", False)):
        return None
    return dict(CPU_WITHOUT_YNNPACK) if _accepted(tuple(CPU_WITHOUT_YNNPACK.items())) else None


@functools.cache
def _accepted(options: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this jaxlib compiles a program with these options (an unknown flag is an error)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    except Exception as e:  # noqa: BLE001 - any rejection means: use XLA's defaults
        logging.warning("XLA rejected compiler options %s (%s); using its defaults.", dict(options), e)
        return False
    return True
