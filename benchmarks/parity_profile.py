"""Where the time goes, both sides: `python -m benchmarks.parity_profile [--small] [--batch 8] [--steps 5]`.

diffax: one call of the compiled train step and of the DDIM sampler under jax.profiler (a Perfetto
trace); XLA:CPU records one event per thunk (a fusion, a convolution, a YNNPACK fusion), named after its
HLO instruction. Each instruction is put in a category from the compiled HLO: a convolution inside it;
else the Python frames of its metadata (GroupNorm.__call__, the attention functions, optax / the EMA);
else a dot; else elementwise. Forward and backward are told apart by JAX's `transpose(` in the op name.
PyTorch: torch.profiler's self CPU time per aten op of one call (benchmarks/torch_side.py), in the same
categories by op name. Prints markdown tables of milliseconds and shares of the summed op time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any, Callable

import jax

from benchmarks.torch_parity import DiffaxSide, TorchSide, torch_python
from diffax import host_memory

OPTIMIZER_FUNCS = ("update_ema", "one_step", "clip_by_global_norm", "scale_by_adam", "apply_updates", "global_norm")
CONTAINERS = ("while", "conditional", "call")  # thunks whose events enclose other thunks' events
ATTENTION_FUNCS = ("AttentionBlock.__call__", "attention", "dot_product_attention")


def _frames(hlo: str) -> dict[int, list[tuple[str, str]]]:
    """stack_frame_id -> [(file, function)] from the innermost frame outwards, from the HLO's frame tables."""
    def table(name: str) -> dict[int, str]:
        m = re.search(rf"^{name}\n(.*?)\n\n", hlo, re.S | re.M)
        return {int(k): v for k, v in re.findall(r"^(\d+) (.*)$", m.group(1), re.M)} if m else {}

    files = {k: v.strip('"') for k, v in table("FileNames").items()}
    funcs = {k: v.strip('"') for k, v in table("FunctionNames").items()}
    locs = {k: (files.get(int(re.search(r"file_name_id=(\d+)", v).group(1)), ""),
                funcs.get(int(re.search(r"function_name_id=(\d+)", v).group(1)), ""))
            for k, v in table("FileLocations").items()}
    raw = {k: (int(re.search(r"file_location_id=(\d+)", v).group(1)), int(re.search(r"parent_frame_id=(\d+)", v).group(1)))
           for k, v in table("StackFrames").items()}
    chains = {}
    for fid in raw:
        chain, seen, cur = [], set(), fid
        while cur in raw and cur not in seen:
            seen.add(cur)
            loc, parent = raw[cur]
            chain.append(locs.get(loc, ("", "")))
            cur = parent - 1  # the table prints parent ids one up (0: no parent)
        chains[fid] = chain
    return chains


def hlo_categories(hlo: str) -> dict[str, str]:
    """HLO instruction name -> category, for every instruction of the compiled module."""
    frames = _frames(hlo)
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comps[current] = []
        elif current and line.startswith("  "):
            comps[current].append(line)
    opcodes = {c: {_opcode(l) for l in lines} for c, lines in comps.items()}
    cats = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = ", line)
            if not m:
                continue
            if _opcode(line) in CONTAINERS:
                continue  # its body's thunks have their own events
            ops = {_opcode(line)}
            for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
                ops |= opcodes.get(called, set())
            op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
            fid = re.search(r"stack_frame_id=(\d+)", line)
            funcs = [f for _, f in frames.get(int(fid.group(1)), [])] if fid else []
            files = [f for f, _ in frames.get(int(fid.group(1)), [])] if fid else []
            cats[m.group(1)] = _category(ops, op_name, funcs, files)
    return cats


def _opcode(line: str) -> str:
    rest = line.split(" = ", 1)[-1]
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rest = rest[i + 1:]
                break
    m = re.match(r"\s*\S*\s+([a-z][\w\-]*)\(", rest) or re.match(r"\s*([a-z][\w\-]*)\(", rest)
    return m.group(1) if m else ""


def _category(ops: set[str], op_name: str, funcs: list[str], files: list[str]) -> str:
    bwd = " bwd" if "transpose(" in op_name else " fwd"  # only conv and GroupNorm are split (as PyTorch's ops are)
    if "convolution" in ops:
        return "conv" + bwd
    if any("optax" in f for f in files) or any(f in OPTIMIZER_FUNCS for f in funcs):
        return "optimizer + EMA"
    if any(f.startswith("GroupNorm") for f in funcs):
        return "GroupNorm" + bwd
    if any(f in ATTENTION_FUNCS for f in funcs):
        return "attention"
    if "dot" in ops:
        return "other matmul"
    if ops <= {"copy", "transpose", "bitcast", "parameter", "tuple", "get-tuple-element"}:
        return "layout copies"
    return "elementwise / other"


def jax_profile(fn: Callable[[], Any], hlo: str, top: int = 0) -> dict[str, float]:
    """Summed thunk milliseconds per category over one call of fn (and the `top` slowest thunks printed)."""
    cats = hlo_categories(hlo)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        fn()
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out: dict[str, float] = collections.Counter()
    per_thunk: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in cats:
            out[cats[e["name"]]] += e.get("dur", 0.0) / 1e3
            per_thunk[e["name"]] += e.get("dur", 0.0) / 1e3
    for name, ms in per_thunk.most_common(top):
        line = next((l for l in hlo.splitlines() if re.match(rf"^\s+(?:ROOT )?%?{re.escape(name)} = ", l)), "")
        print(f"{ms:9.1f} ms  {cats[name]:22s} {name}: {line.strip()[:160]}")
    return dict(out)


def torch_category(name: str) -> str | None:
    n = name.lower()
    if n.startswith(("optimizer.", "optimizer#")) or "_foreach" in n or "clip_grad" in n:
        return "optimizer + EMA"
    if "convolution_backward" in n:
        return "conv bwd"
    if "conv" in n and "backward" not in n:
        return "conv fwd"
    if "group_norm" in n:
        return "GroupNorm bwd" if "backward" in n else "GroupNorm fwd"
    if "attention" in n or n in ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data"):
        return "attention"
    if n in ("aten::addmm", "aten::mm"):
        return "other matmul"
    if n in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::permute", "aten::transpose", "aten::cat"):
        return "layout copies"
    if n.startswith("aten::"):
        return "elementwise / other"
    return None  # profiler ranges (autograd nodes, module names): their ops are counted as ops


def torch_profile(side: TorchSide, kind: str, batch: int, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        side.ask(op="profile", kind=kind, batch=batch, steps=steps, out=os.path.join(d, "p.json"))
        with open(os.path.join(d, "p.json")) as f:
            rows = json.load(f)
    out: dict[str, float] = collections.Counter()
    for r in rows:
        cat = torch_category(r["name"])
        if cat:
            out[cat] += r["self_cpu_us"] / 1e3
    return dict(out)


def markdown(title: str, ours: dict[str, float], theirs: dict[str, float]) -> str:
    cats = sorted(set(ours) | set(theirs), key=lambda c: -max(ours.get(c, 0), theirs.get(c, 0)))
    to, tt = sum(ours.values()), sum(theirs.values())
    lines = [f"**{title}**", "", "| category | diffax ms | diffax % | PyTorch ms | PyTorch % |", "|---|---|---|---|---|"]
    for c in cats:
        o, t = ours.get(c, 0.0), theirs.get(c, 0.0)
        lines.append(f"| {c} | {o:.0f} | {100 * o / to:.1f} | {t:.0f} | {100 * t / tt:.1f} |")
    lines.append(f"| total | {to:.0f} | 100 | {tt:.0f} | 100 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="DDIM steps of the profiled sampling call")
    p.add_argument("--what", default="train,sample")
    p.add_argument("--torch-python", default="")
    p.add_argument("--top", type=int, default=0, help="print the N slowest diffax thunks with their HLO")
    args = p.parse_args(argv)
    python = args.torch_python or torch_python()
    out = []
    with tempfile.TemporaryDirectory(prefix="diffax_parity_") as folder:
        side = TorchSide(python, folder, args.small, 2)
        try:
            ours = DiffaxSide(folder, args.batch, args.steps)
            if "train" in args.what:
                ours.train(), side.ask(op="train", batch=args.batch)  # warm-up
                hlo = ours.bench.compiled.as_text()
                out.append(markdown(f"train step, batch {args.batch}", jax_profile(ours.train, hlo, args.top),
                                    torch_profile(side, "train", args.batch, 0)))
            if "sample" in args.what:
                ours.sample(), side.ask(op="sample", batch=args.batch, steps=args.steps)
                hlo = ours.sample_fn.lower(ours.bench.state.ema, ours.noise, jax.random.key(2), None).compile().as_text()
                out.append(markdown(f"DDIM-{args.steps} sampling, batch {args.batch}", jax_profile(ours.sample, hlo, args.top),
                                    torch_profile(side, "sample", args.batch, args.steps)))
        finally:
            side.close()
    text = "\n\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # as the `diffax` command runs
    main()
