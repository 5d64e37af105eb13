"""diffax/host_memory.py: XLA:CPU's per-execution temporary buffer is reused instead of page-faulted in again."""
from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys

import pytest

from diffax import cli, host_memory

# A jitted program whose one temporary (sin(x), 64 MB) cannot be fused into the dot that reads it, called nine
# times: prints whether the setting was applied, then the minor page faults of each call after the warm-up.
PROGRAM = """
import resource
from diffax import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum())
x, w = jnp.ones((16384, 1024)), jnp.ones((1024, 8))
f(x, w).block_until_ready()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def _faults(malloc: str) -> tuple[str, list[int]]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", DIFFAX_HOST_MALLOC=malloc)
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied, [int(f) for f in faults]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_temporary_buffer_is_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    applied, faults = _faults("")  # the default: reused from the heap
    # The heap holds the block from then on; a call can still grow it now and then (a small allocation placed
    # where the freed block was, as under a parallel test run), so: most calls fault nothing in
    assert applied == "True" and sorted(faults)[len(faults) // 2] < pages // 100, faults
    applied, faults = _faults("system")  # glibc's and JAX's defaults: mmapped and faulted in again every call
    assert applied == "False" and min(faults) > pages // 2, faults


def test_not_applied_once_jax_has_started():
    import jax

    jax.devices()  # this test process's backends exist
    assert not host_memory.keep_freed_memory()


def test_cpu_backend_expected_reads_jax_platforms(monkeypatch):
    monkeypatch.delenv("DIFFAX_HOST_MALLOC", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.cpu_backend_expected()
    assert not host_memory.keep_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_backend_expected()


def test_diffax_command_sets_it_before_the_command_and_not_for_help(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append("host"))
    monkeypatch.setattr(sys, "argv", ["diffax", "--help"])
    cli.main()
    assert calls == [] and "train" in capsys.readouterr().out  # help and bad input answer without JAX
    command = dataclasses.replace(cli.COMMANDS["sweep"], main=lambda fv, positional: calls.append("command"))
    monkeypatch.setitem(cli.COMMANDS, "sweep", command)
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")
    monkeypatch.setattr(sys, "argv", ["diffax", "sweep", "--config", config, "--workdir", str(tmp_path)])
    cli.main()
    assert calls == ["host", "command"]
