"""What every benchmark records: the device, its peak FLOP/s, the environment, medians, abstract arguments."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
from typing import Any

import jax

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


def flops_of(compiled: Any) -> float:
    """FLOPs of a compiled XLA program by its cost analysis (0 when the backend gives none).

    For an SPMD program this is one device's share: XLA analyses the partitioned module.
    """
    try:  # benchmarks/models.py has the same helper; use it when present so both count alike
        from benchmarks.models import flops_of as models_flops_of
    except ImportError:
        models_flops_of = None
    if models_flops_of is not None:
        return float(models_flops_of(compiled))
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))

