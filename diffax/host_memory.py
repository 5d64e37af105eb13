"""Keep XLA:CPU's per-execution temporary buffer in the heap, so that it is not page-faulted in every step.

XLA:CPU allocates each execution's temporary buffer (686 MB for the DDPM CIFAR-10 UNet's train step at
batch 8, ~2 GB at batch 32) with malloc and frees it afterwards. glibc serves a block that large with a
fresh mmap and gives it back with munmap, so every step page-faults all of it in again and the kernel zeroes
every page: `clear_page_erms` was 26% of the process's CPU time in a batch-32 train step (perf), 560k minor
faults per step; on the README's default digits run, 56 of its 390 CPU seconds were the kernel's.

Two settings, made together by `keep_freed_memory()`:
* XLA:CPU runs each single-device execution on the calling thread (`jax_cpu_enable_async_dispatch` off)
  instead of a worker thread, so the buffer comes from the main thread's arena: glibc's main arena grows
  the heap with brk and can hold a block of any size, while a thread's own arena is capped at 64 MB and
  serves anything larger with mmap whatever the options below say.
* glibc's `mallopt`: no mmap for large blocks and the heap never trimmed, so the freed block stays in the
  heap and the next execution reuses it.

Faster with no trade seen: the UNet train step 2.1 s against 2.6 s at batch 8 (0 faults per step against
168k) and 8.2-8.6 s against 10.2-11.1 s at batch 32; the default digits run 208.5 s against 215.4 s, the
kernel's time 5 s against 56 s; DDIM sampling level (benchmarks/torch_parity.md, "Fourth round"). Python
can no longer run ahead of a CPU execution, which cost nothing measurable even on the digits run's ~90 ms
steps. Values are untouched.

Applied by the `diffax` command once its input is checked (importing JAX costs 1.5 s, which help and error
messages need not pay) and by the benchmarks first; in both before JAX creates its CPU client (the dispatch
setting is read then), where the backend will be the CPU (no accelerator plugin, or JAX_PLATFORMS=cpu) and
the C library is glibc; `DIFFAX_HOST_MALLOC=system` leaves both as they are. The cost: the process keeps its
peak host memory until it exits (which it reaches anyway, every step).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# mallopt parameters (glibc's malloc.h): no mmap for large blocks; trim threshold -1 (SIZE_MAX in glibc):
# never give the top of the heap back.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
OPTIONS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def cpu_backend_expected() -> bool:
    """Whether JAX will run on the CPU, decided without initialising a backend (which would be too late)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    has_plugin = any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))
    return not (has_plugin or importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))


def keep_freed_memory() -> bool:
    """Run CPU executions on the calling thread and keep freed blocks in its heap (module docstring).

    True if it did; False where `DIFFAX_HOST_MALLOC=system`, off the CPU, off glibc, or once JAX's backends
    exist (the dispatch setting would no longer apply, and the heap setting alone does not help)."""
    if os.environ.get("DIFFAX_HOST_MALLOC", "").lower() == "system" or not cpu_backend_expected():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in OPTIONS)
