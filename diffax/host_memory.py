"""Keep freed host memory for reuse on the CPU backend (glibc's malloc options, set once at process start).

XLA:CPU allocates each execution's temporary buffer (686 MB for the DDPM CIFAR-10 UNet's train step at
batch 8, ~2 GB at batch 32) with malloc and frees it afterwards. glibc serves a block that large with a
fresh mmap and gives it back with munmap, so every step page-faults all of it in again and the kernel zeroes
every page: `clear_page_erms` was 26% of the process's CPU time in a batch-32 train step (perf), 560k minor
faults per step. With one malloc arena, no mmap for large blocks and no trimming of the heap, the block is
reused from the heap: no faults, and the step is faster (benchmarks/torch_parity.md, "Third round").

Opt-in, with `DIFFAX_HOST_MALLOC=reuse` in the environment: on the default digits run (a small model, the
input pipeline's threads busy beside XLA's) it made training 25-40% slower, probably the single arena's lock
traffic (6.6-7.6 against 9.5-10.9 steps/s), while the batch-32 UNet train step ran faster. The options only take
effect for threads that have not allocated yet, so the `diffax` command calls this first, before JAX creates
its CPU client; and only where the backend will be the CPU (no accelerator plugin, or JAX_PLATFORMS=cpu)
and the C library is glibc. The cost: the process keeps its peak host memory until it exits, and the heap
can fragment (a small block carved from a freed large one makes the next large request grow the heap; seen
on a toy program, not on the UNet's train step).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# one arena: a thread's own arena is capped at 64 MB and serves larger blocks by mmap whatever M_MMAP_MAX says;
# no mmap: large blocks come from the heap; trim threshold -1 (SIZE_MAX in glibc): never give the top back.
OPTIONS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def cpu_backend_expected() -> bool:
    """Whether JAX will run on the CPU, decided without initialising a backend (which would be too late)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    has_plugin = any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))
    return not (has_plugin or importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))


def keep_freed_memory() -> bool:
    """With DIFFAX_HOST_MALLOC=reuse, set glibc's malloc to reuse freed blocks (module docstring); True if it did."""
    if os.environ.get("DIFFAX_HOST_MALLOC", "").lower() != "reuse" or not cpu_backend_expected():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in OPTIONS)
