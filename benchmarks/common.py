"""What every benchmark records: the device, its peak FLOP/s, the environment, medians, abstract arguments."""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
from typing import Any, Callable

import jax
import jax.extend

# Dense bfloat16 peak TFLOP/s per device (vendor data sheets), matched against jax.devices()[0].device_kind
# in this order (the first substring test that passes wins; "H100 PCIe" must come before plain "H100").
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), 835.0),
    (("h100",), 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    (("gh200",), 989.0),
    (("h200",), 989.0),
    (("a100",), 312.0),
    (("tpu v4",), 275.0),
    (("tpu v5 lite",), 197.0),  # v5e
    (("tpu v5e",), 197.0),
    (("tpu v5p",), 459.0),
    (("tpu v5",), 459.0),  # v5p reports itself as "TPU v5"
    (("tpu v6 lite",), 918.0),  # v6e (Trillium)
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bfloat16 peak FLOP/s of one device of this kind, or None when unknown (CPU, other chips)."""
    kind = device_kind.lower()
    for needles, tflops in PEAK_BF16_TFLOPS:
        if all(n in kind for n in needles):
            return tflops * 1e12
    return None


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def environment(argv: list[str]) -> dict[str, Any]:
    """Date, versions, devices and the exact command line of this benchmark run."""
    import jaxlib

    dev = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run", *[_quote(a) for a in argv]]).strip(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "host_cpus": os.cpu_count(),
        "host": platform.processor() or platform.machine(),
        "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = os.getloadavg()[0]  # other users of a shared machine show up here
    return env


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def abstract(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for `jit(f).lower(...)`."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled XLA program by its cost analysis (0 when the backend gives none).

    For an SPMD program this is one device's share: XLA analyses the partitioned module. XLA counts
    a while loop's body once, whatever its trip count, so a `lax.scan` is undercounted: see
    `matmul_flops`.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def matmul_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of the matrix products in fn(*args): 2 x the multiply-adds of every dot_general and
    convolution in its jaxpr, a scan body counted `length` times (the model-FLOPs convention of
    MFU, Chowdhery et al. 2022, app. B; elementwise work is left out). Global, not per device."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)  # a jit with compiler_options cannot be nested
    return _jaxpr_flops(jitted.trace(*args).jaxpr.jaxpr)


def _jaxpr_flops(jaxpr: Any) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # one output element: the kernel's elements per output feature
            total += 2.0 * math.prod(out) * math.prod(rhs) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        subs = [_jaxpr_flops(j) for j in _subjaxprs(eqn.params)]
        if name == "cond":
            total += max(subs, default=0.0)  # one branch runs
        else:  # a while loop's trip count is unknown: its body counts once
            total += sum(subs) * (eqn.params["length"] if name == "scan" else 1)
    return total


def _subjaxprs(params: dict) -> list:
    found = []
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                found.append(v.jaxpr)
            elif isinstance(v, jax.extend.core.Jaxpr):
                found.append(v)
    return found
