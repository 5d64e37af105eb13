"""diffax/host_memory.py: XLA:CPU's per-execution temporary buffer is reused instead of page-faulted in again."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from diffax import cli, host_memory

# From a thread other than the main one (as XLA:CPU's), malloc a 64 MB block, write it, free it, four times:
# prints whether the setting was applied, the bytes glibc holds in mmapped blocks while the first is live,
# and the minor page faults of each round. XLA:CPU's temporary buffer of every execution is such a block.
PROGRAM = """
import ctypes, resource, threading
from diffax import host_memory
applied = host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2
size, out = 64 << 20, {"faults": []}
def rounds():
    for i in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        out["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        out.setdefault("mmapped", libc.mallinfo2().hblkhd)
        libc.free(block)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(applied, out["mmapped"], *out["faults"])
"""


def _rounds(malloc: str) -> tuple[str, int, list[int]]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", DIFFAX_HOST_MALLOC=malloc)
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    applied, mmapped, *faults = out.stdout.split()
    return applied, int(mmapped), [int(f) for f in faults]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_freed_large_block_is_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    applied, mmapped, faults = _rounds("reuse")
    assert applied == "True"
    assert mmapped < 64 << 20  # from the heap, not an mmap of its own
    assert faults[0] > pages // 2 and max(faults[1:]) < pages // 100  # faulted in once, then reused
    applied, mmapped, faults = _rounds("")  # the default: glibc's: mmapped, and faulted in again every time
    assert applied == "False" and mmapped >= 64 << 20 and min(faults) > pages // 2


def test_cpu_backend_expected_reads_jax_platforms(monkeypatch):
    monkeypatch.setenv("DIFFAX_HOST_MALLOC", "reuse")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.cpu_backend_expected()
    assert not host_memory.keep_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_backend_expected()


def test_diffax_command_sets_it_first(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["diffax", "--help"])
    cli.main()
    assert calls == [1] and "train" in capsys.readouterr().out
