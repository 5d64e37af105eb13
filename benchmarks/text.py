"""Text-encoder benchmark: `python -m benchmarks.text [--quick] [--layout clip,t5] [--clip L] [--t5 base]
[--batch 64] [--length 77] [--dtype bfloat16] [--folder DIR] [--output R.json]`;
`python -m benchmarks.text --sampling configs/digits_text.py [--batch 64] [--repeats 3]`.

Measures, on whatever devices JAX finds, the encoders of diffax.models.text.pretrained with random
weights at the sizes of the released models (no download):

  prompts_per_s     batch / (median time of one jitted encoder call on a fixed [batch, length] batch,
                    over repeats after a warm-up)
  compile_s         the first call's trace + compile time
  flops, mfu        matrix-product FLOPs of one call (benchmarks/common.py matmul_flops) and the
                    achieved fraction of the device's dense bf16 peak (None where unknown, e.g. CPU)
  tokenize_per_s    with --folder: the folder's tokenizer on `batch` prompts (host side), and the
                    folder's own encoder measured beside the random-weight ones

--sampling CONFIG (e.g. configs/digits_text.py): the text model of CONFIG (random weights) sampled with
its config.sampling (sampler, steps, guidance) on `batch` prompts, the encoder run once per batch (as
diffax samples) and in every network evaluation (the sampler fed tokens, as diffax did before):

  speedup           seconds per batch encoding at every step / encoding once (median of repeats)
  flops_ratio       the same ratio of the two programs' matrix-product FLOPs (machine-independent)

CLIP sizes (text tower): L (ViT-L/14, SD 1.x: 768 wide, 12 blocks), H (OpenCLIP ViT-H/14, SD 2.x:
1024, 23 blocks as diffusers ships it), bigG (OpenCLIP ViT-bigG/14, SDXL's second encoder: 1280,
32 blocks, projection 1280). T5 sizes (v1.1 encoders, gated-gelu): small, base, large, xl, xxl (4096
wide, 24 blocks: Imagen / SD3 / Flux; needs ~19 GB for float32 parameters). --quick: tiny sizes,
batch 8, few repeats, a CPU smoke run. Wall-clock figures are only meaningful on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import jax
import numpy as np
from flax import nnx

from benchmarks.common import environment, matmul_flops, median, peak_flops

# name -> CLIPTextEncoder keyword arguments (from the released config.json files)
CLIP_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4),
    "L": dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),
    "H": dict(hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu"),
    "bigG": dict(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu",
                 projection_dim=1280),
}
# name -> T5Encoder keyword arguments (google/t5-v1_1-* encoders)
T5_SIZES = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


def build(layout: str, size: str, dtype: str, length: int) -> nnx.Module:
    """A random-weight encoder of the layout and size (parameters initialised in one jitted program)."""
    from diffax.models import construct
    from diffax.models.text.pretrained import CLIPTextEncoder, T5Encoder

    if layout == "clip":
        kw = dict(vocab_size=49408, max_positions=max(77, length), eos_token_id=49407, **CLIP_SIZES[size])
        encoder = construct(lambda r: CLIPTextEncoder(**kw, dtype=dtype, rngs=r), nnx.Rngs(0))
    else:
        kw = dict(vocab_size=32128, ff_act="gelu_new", gated=True, **T5_SIZES[size])
        encoder = construct(lambda r: T5Encoder(**kw, dtype=dtype, rngs=r), nnx.Rngs(0))
    jax.block_until_ready(nnx.state(encoder))  # initialisation is dispatched asynchronously: not part of compile_s
    return encoder


def measure(encoder: nnx.Module, ids: np.ndarray, mask: np.ndarray, repeats: int) -> dict:
    """prompts/s, compile time and FLOPs of one jitted call of `encoder` on (ids, mask)."""
    graphdef, state = nnx.split(encoder)
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    start = time.perf_counter()
    jax.block_until_ready(fn(state, ids, mask))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(state, ids, mask))
        times.append(time.perf_counter() - start)
    seconds = median(times)
    flops = matmul_flops(fn, state, ids, mask)
    peak = peak_flops(jax.devices()[0].device_kind)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(encoder, nnx.Param)))
    return {"prompts_per_s": ids.shape[0] / seconds, "seconds_per_batch": seconds, "compile_s": compile_s,
            "params": int(params), "flops": flops, "flops_per_s": flops / seconds,
            "mfu": None if peak is None else flops / seconds / (peak * jax.device_count())}


def sampling_speedup(config, *, batch: int, repeats: int) -> dict:
    """`--sampling`: the text model of `config` sampled with its encoder run once vs at every step (see above)."""
    from diffax import compilation, parallel, samplers
    from diffax.training import text
    from diffax.training.build import build
    from diffax.training.inference import make_sample_fn
    from diffax.training.step import state_layout

    d = build(config)
    if d.null_tokens is None:
        raise SystemExit("--sampling: the config is not a text model (config.text.encoder is empty)")
    mesh = parallel.make_mesh(config.mesh)
    _, _, shardings = state_layout(d, config, mesh)
    tok = d.tokenizer
    if tok is None:  # the small encoder: a word tokenizer over the config's own preview prompts
        from diffax.models.text.small import WordTokenizer

        tok = WordTokenizer.build(text.preview_prompts(config), int(config.text.vocab_size), int(config.text.max_length))
    tokens = jax.device_put(text.tokens_of(tok, text.preview_prompts(config) * batch)[:batch])
    noise = jax.random.normal(jax.random.key(0), (batch, *d.data_shape))
    key, params = jax.random.key(1), d.sampling_params(d.params)
    once = make_sample_fn(d, config, mesh, shardings.ema)
    every = jax.jit(lambda p, z, k, y: samplers.make_sampler(config)(
        d.schedule(p), d.parameterization, d.apply_fn(p), z, k, y, null_label=d.null_tokens),
        compiler_options=compilation.compiler_options(config))  # as make_sample_fn
    result = {"config_sampler": str(config.sampling.sampler), "steps": int(config.sampling.steps),
              "guidance_scale": float(config.sampling.guidance_scale), "batch": batch}
    fns = {"once": once, "every_step": every}
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        jax.block_until_ready(fn(params, noise, key, tokens))  # compile
        result[f"{name}_flops"] = matmul_flops(fn, params, noise, key, tokens)
    for _ in range(repeats):  # interleaved, so a change in the machine's load hits both alike
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, noise, key, tokens))
            times[name].append(time.perf_counter() - start)
    for name in fns:
        result[f"{name}_s"] = median(times[name])
    result["speedup"] = result["every_step_s"] / result["once_s"]
    result["flops_ratio"] = result["every_step_flops"] / result["once_flops"]
    return result


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, batch 8, 3 repeats: a CPU smoke run")
    p.add_argument("--layout", default="clip,t5", help="comma-separated: clip, t5")
    p.add_argument("--clip", choices=sorted(CLIP_SIZES), help="default L (--quick: tiny)")
    p.add_argument("--t5", choices=sorted(T5_SIZES), help="default base (--quick: tiny)")
    p.add_argument("--batch", type=int, help="default 64 (--quick: 8)")
    p.add_argument("--length", type=int, default=77, help="tokens per prompt")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="activations; default bfloat16 (--quick: float32)")
    p.add_argument("--repeats", type=int, help="default 10 (--quick: 3)")
    p.add_argument("--folder", default="", help="also a transformers folder's own encoder and tokenizer")
    p.add_argument("--sampling", default="", metavar="CONFIG",
                   help="instead: a text config's sampling speed-up from encoding prompts once")
    p.add_argument("--output", default="")
    args, overrides = p.parse_known_args(argv)  # --config.a.b=value overrides of --sampling's config
    defaults = dict(clip="tiny", t5="tiny", batch=8, repeats=3, dtype="float32") if args.quick else dict(
        clip="L", t5="base", batch=64, repeats=10, dtype="bfloat16")
    for name, value in defaults.items():  # explicit flags win over --quick
        if getattr(args, name) is None:
            setattr(args, name, value)
    rng = np.random.default_rng(0)
    result = {"environment": environment(sys.argv), "batch": args.batch, "length": args.length, "dtype": args.dtype}
    if overrides and not args.sampling:
        p.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.sampling:
        from benchmarks.run import load_config

        from benchmarks.run import apply_overrides

        config = load_config(args.sampling)
        applied = apply_overrides(config, overrides)
        result = {"environment": result["environment"], "overrides": applied,
                  "sampling": sampling_speedup(config, batch=args.batch, repeats=args.repeats)}
        args.layout, args.folder = "", ""
    for layout in [x.strip() for x in args.layout.split(",") if x.strip()]:
        if layout not in ("clip", "t5"):
            raise SystemExit(f"--layout: unknown {layout!r}; valid: clip, t5")
        size = args.clip if layout == "clip" else args.t5
        encoder = build(layout, size, args.dtype, args.length)
        vocab = 49406 if layout == "clip" else 32000
        ids = rng.integers(0, vocab, (args.batch, args.length)).astype(np.int32)
        ids[:, -1] = 49407 if layout == "clip" else 1  # an end token, as the tokenizers write
        result[f"{layout}_{size}"] = measure(encoder, ids, np.ones_like(ids), args.repeats)
        del encoder
    if args.folder:
        from diffax.models.text.pretrained import load_text_encoder

        encoder, tok = load_text_encoder(args.folder, dtype=args.dtype)
        prompts = [f"a photograph of an astronaut riding a horse, number {i}" for i in range(args.batch)]
        times = []
        with warnings.catch_warnings():  # a long prompt warns once per call
            warnings.simplefilter("ignore")
            for _ in range(args.repeats):
                start = time.perf_counter()
                ids, mask = tok(prompts)
                times.append(time.perf_counter() - start)
        result["folder"] = {"path": args.folder, "tokenize_per_s": args.batch / median(times),
                            **measure(encoder, ids, mask, args.repeats)}
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
