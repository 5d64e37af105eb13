"""Page faults and kernel time per train step, the cost diffax/host_memory.py removes:
`python -m benchmarks.host_memory [--batch 32] [--steps 4]` (as the `diffax` command runs: the temporary
buffer kept for reuse) and `DIFFAX_HOST_MALLOC=system python -m benchmarks.host_memory ...` (glibc's and
JAX's defaults).

The DDPM CIFAR-10 UNet's train step as benchmarks/torch_parity.py builds it (a random diffusers model,
imported; needs the torch venv of that benchmark to write it). Prints, per step: wall seconds, minor page
faults, user and system CPU seconds (getrusage), and the process's peak resident memory.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

from diffax import host_memory


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--small", action="store_true")
    args = p.parse_args(argv)
    from benchmarks.torch_parity import DiffaxSide, TorchSide, torch_python

    with tempfile.TemporaryDirectory(prefix="diffax_host_memory_") as folder:
        TorchSide(torch_python(), folder, args.small, 1).close()  # only the random diffusers folder
        side = DiffaxSide(folder, args.batch, 5)
        side.train(), side.train()  # compile, then one step that sizes the heap
        print(f"| step (batch {args.batch}) | s | minor faults | user s | sys s | peak RSS GB |\n|---|---|---|---|---|---|")
        for i in range(args.steps):
            r0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            side.train()
            r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
            print(f"| {i} | {wall:.2f} | {r1.ru_minflt - r0.ru_minflt} | {r1.ru_utime - r0.ru_utime:.2f} | "
                  f"{r1.ru_stime - r0.ru_stime:.2f} | {r1.ru_maxrss / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    print("host memory kept:", host_memory.keep_freed_memory())
    main()
