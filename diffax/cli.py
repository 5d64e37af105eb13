"""The `diffax` command (also `python -m diffax`): one sub-command per job.

Each sub-command has its own absl flags (so `diffax train --help` lists only
train's) and takes an ml_collections config file whose fields can be
overridden on the command line: `--config configs/x.py:arg --config.a.b=value`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from typing import Callable

from absl import flags, logging
from ml_collections import config_flags

from diffax import errors, host_memory

PROG = "diffax"


@dataclasses.dataclass
class Command:
    name: str
    summary: str
    define: Callable[[flags.FlagValues], None]
    main: Callable[[flags.FlagValues, list[str]], None]  # (flags, positional arguments)
    required: tuple[str, ...] = ()  # flags that must be given
    positional: str = ""  # e.g. "SRC DST"; empty: no positional arguments
    distributed: bool = True  # join a multi-host job (not for commands that only launch others)


def _config_flag(fv: flags.FlagValues, required: bool) -> None:
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file, optionally with an argument: configs/x.py or configs/x.py:variant. "
        "Override any field with --config.section.field=value." + ("" if required else " Default: the workdir's config.json."),
        flag_values=fv,
        lock_config=True,
    )


# ----------------------------------------------------------------------------- train
def _define_train(fv: flags.FlagValues) -> None:
    _config_flag(fv, False)
    flags.DEFINE_string("workdir", None, "Run folder: config, checkpoints, logs and samples. Resumed if it holds a run.", flag_values=fv)
    flags.DEFINE_bool("force", False, "Resume even if the workdir's run has a different config (the old config is kept).", flag_values=fv)


def _train(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.training import trainer

    trainer.train(_config_or_workdirs(fv), fv.workdir, force=fv.force)


# ----------------------------------------------------------------------------- sample
def _define_sample(fv: flags.FlagValues) -> None:
    _config_flag(fv, False)
    flags.DEFINE_string("workdir", None, "The run to sample from.", flag_values=fv)
    flags.DEFINE_string("output", None, "Folder for samples.npz (uint8 'images', int32 'labels', empty when unconditional) and grid.png.", flag_values=fv)
    flags.DEFINE_string("sampler", None, "Sampler name (default: config.sampling.sampler).", flag_values=fv)
    flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sampling.steps).", flag_values=fv)
    flags.DEFINE_integer("num_samples", 64, "How many samples to draw.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the initial noise and the sampler's randomness.", flag_values=fv)
    flags.DEFINE_string("noise", None, "A .npy file of initial noise [num_samples, ...] to start from instead of the seed.", flag_values=fv)
    flags.DEFINE_string("ema", "true", "Which weights: 'true' the EMA of config.training.ema_decay, 'false' the raw "
                        "weights, or a sigma_rel such as 0.08: the post-hoc EMA of that length (--step: a snapshot "
                        "step; see diffax ema-reconstruct).", flag_values=fv)
    flags.DEFINE_multi_string("prompt", [], "Text models: a prompt (repeatable); the samples cycle through the "
                              "prompts, and prompts.txt beside the grid lists each sample's. '' = unconditional.",
                              flag_values=fv)
    flags.DEFINE_string("prompts", None, "Text models: a file of prompts, one per line (after any --prompt).",
                        flag_values=fv)
    flags.DEFINE_string("negative_prompt", None, "Text models: the unconditional input of guidance "
                        "(default: config.sampling.negative_prompt, '' = the empty prompt).", flag_values=fv)
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: config.sampling.guidance_scale; "
                       "1 = none).", flag_values=fv)


def _sample(fv: flags.FlagValues, args: list[str]) -> None:
    import numpy as np

    from diffax.training import inference
    from diffax.training import workdir as workdir_lib
    from diffax.visualize import save_samples

    config = _config_or_workdirs(fv)
    with config.unlocked():
        if fv.sampler is not None:
            config.sampling.sampler = fv.sampler
        if fv.steps is not None:
            config.sampling.steps = fv.steps
        if fv.guidance_scale is not None:
            config.sampling.guidance_scale = fv.guidance_scale
        if fv.negative_prompt is not None:
            config.sampling.negative_prompt = fv.negative_prompt
    from diffax.training import text

    prompts = text.read_prompts(fv.prompt, fv.prompts or "")
    if fv.prompts and not prompts:
        raise errors.UserError(f"--prompts {fv.prompts} holds no prompt (every line is blank).")
    workdir_lib.check_writable(fv.output, what="--output")  # before drawing, not after
    noise = _load_noise(fv.noise, fv.num_samples) if fv.noise else None
    ema = fv.ema.strip().lower()
    if ema in ("true", "false"):
        run = inference.load(fv.workdir, step=fv.step, use_ema=ema == "true", config=config)
    else:
        from diffax.training import posthoc_snapshots

        sigma_rel = posthoc_snapshots.parse_sigma_rels(fv.ema, "--ema")
        if len(sigma_rel) != 1:
            raise ValueError(f"--ema={fv.ema}: sample takes one sigma_rel (diffax eval takes several).")
        run = inference.load(fv.workdir, step=fv.step, config=config, ema_sigma_rel=sigma_rel[0])
    if noise is not None and noise.shape[1:] != tuple(run.diffusion.data_shape):
        raise errors.UserError(f"--noise {fv.noise} holds samples of shape {noise.shape[1:]} but this model draws "
                               f"{tuple(run.diffusion.data_shape)}.")
    tokens = None
    if prompts or fv.negative_prompt:
        if not run.is_text:
            raise errors.UserError("--prompt / --prompts / --negative_prompt were given, but this run is not a "
                                   "text-to-image model (config.text.encoder is empty): drop them.")
    if prompts:
        prompts = [prompts[i % len(prompts)] for i in range(fv.num_samples)]
        tokens = run.prompt_tokens(prompts)
        with open(os.path.join(fv.output, "prompts.txt"), "w", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in prompts))
    out = run.draw(fv.num_samples, fv.seed, noise=noise, labels=tokens)
    labels = out["labels"] if out["labels"] is not None else np.zeros((0,), np.int32)  # no object array: no pickle
    np.savez(os.path.join(fv.output, "samples.npz"), images=out["images"], labels=labels,
             **({"prompts": np.asarray(prompts, dtype=np.str_)} if prompts else {}))
    grid = os.path.join(fv.output, "grid.png")
    save_samples(out["images"][:256], grid, title=f"{fv.num_samples} samples")  # a grid of at most 256
    print(f"{fv.num_samples} samples from step {run.step} ({config.sampling.sampler}, {config.sampling.steps} steps) "
          f"in {fv.output}/samples.npz and {grid}")


def _load_noise(path: str, num_samples: int):
    """The --noise array: a .npy file of num_samples initial noises."""
    import numpy as np

    try:
        noise = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise errors.UserError(f"--noise {path}: no such file.") from None
    except (OSError, ValueError, EOFError) as e:
        raise errors.UserError(f"--noise {path} is not a .npy array file ({type(e).__name__}). Save the noise with "
                               "numpy.save(path, array), array of shape [num_samples, ...].") from None
    if not isinstance(noise, np.ndarray):  # an .npz archive
        raise errors.UserError(f"--noise {path} is an .npz archive; give a .npy file (numpy.save) of one array.")
    if noise.ndim < 2 or noise.shape[0] != num_samples:
        raise errors.UserError(f"--noise {path} holds an array of shape {noise.shape}, but --num_samples={num_samples}: "
                               f"give [{num_samples}, ...] or change --num_samples.")
    return noise


# ----------------------------------------------------------------------------- eval, stats, convert-inception
def _define_eval(fv: flags.FlagValues) -> None:
    _config_flag(fv, False)
    flags.DEFINE_string("workdir", None, "The run whose checkpoints to evaluate; results go to <workdir>/eval/.", flag_values=fv)
    flags.DEFINE_enum("checkpoints", "all", ["all", "latest"], "Which checkpoints: all of them or the latest.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Evaluate only the checkpoint at this step.", flag_values=fv)
    flags.DEFINE_bool("watch", False, "Keep waiting for new checkpoints until the run's last step is evaluated.", flag_values=fv)
    flags.DEFINE_string("ema", None, "Post-hoc EMA lengths to compare, e.g. 0.03,0.05,0.08,0.12: each sigma_rel's "
                        "EMA at the latest snapshot (or --step) is scored, then plotted as eval/posthoc_ema.png.",
                        flag_values=fv)


def _eval(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.evaluation import job

    if fv.ema is not None:
        from diffax.evaluation import ema_sweep
        from diffax.training import posthoc_snapshots

        sigma_rels = posthoc_snapshots.parse_sigma_rels(fv.ema, "--ema")
        ema_sweep.run(_config_or_workdirs(fv), fv.workdir, sigma_rels, step=fv.step)
        return
    records = job.run_eval(_config_or_workdirs(fv), fv.workdir, step=fv.step, mode=fv.checkpoints, watch=fv.watch)
    print(f"evaluated {len(records)} checkpoint(s); results in {os.path.join(fv.workdir, 'eval', 'results.jsonl')}")


def _define_stats(fv: flags.FlagValues) -> None:
    _config_flag(fv, True)
    flags.DEFINE_string("output", None, "The .npz to write (keys mu, sigma), e.g. stats/cifar10_train.npz.", flag_values=fv)


def _stats(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.evaluation import job

    job.compute_reference_stats(fv.config, fv.output)
    print(f"reference statistics of {fv.config.data.name} in {fv.output}")


def _convert_inception(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.evaluation import convert

    convert.main(args)


def _define_prepare(fv: flags.FlagValues) -> None:
    _config_flag(fv, True)


def _prepare(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax import data

    data.prepare(fv.config)


def _define_nothing(fv: flags.FlagValues) -> None:
    pass


# ----------------------------------------------------------------------------- import-diffusers
def _define_import(fv: flags.FlagValues) -> None:
    _config_flag(fv, False)
    flags.DEFINE_string("src", None, "A diffusers pipeline folder (unet/, scheduler/; a Stable Diffusion 1.x / 2.x "
                        "pipeline also vae/, text_encoder/, tokenizer/) or a UNet2DModel folder "
                        "(config.json + diffusion_pytorch_model.safetensors).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "The new run folder: config.json and a step-0 checkpoint.", flag_values=fv)


def _import_diffusers(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.training import importing

    base = fv.config if fv.config is not None else _default_config()
    config = importing.import_diffusers(fv.src, fv.workdir, base)
    prompt = " --prompt TEXT" if config.text.encoder else ""
    print(f"imported {fv.src} into {fv.workdir} (step 0; {config.diffusion.schedule} schedule, "
          f"{config.diffusion.prediction} prediction). Sample: diffax sample --workdir {fv.workdir} --output DIR"
          f"{prompt}; fine-tune: diffax train --workdir {fv.workdir}"
          + (" --config.data.name=folder:DIR (captioned images)" if prompt else ""))


# ----------------------------------------------------------------------------- export-diffusers
def _define_export(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "The run to export.", flag_values=fv)
    flags.DEFINE_string("output", None, "A new folder: unet/ and scheduler/ (and, for a run imported from a Stable "
                        "Diffusion pipeline, its vae/, text_encoder/, tokenizer/ and model_index.json).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_bool("ema", True, "Export the EMA weights (--noema: the raw weights).", flag_values=fv)


def _export_diffusers(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.training import importing

    out = importing.export_diffusers(fv.workdir, fv.output, use_ema=fv.ema, step=fv.step)
    print(f"exported step {out['step']} of {fv.workdir} as a diffusers {out['unet']['_class_name']} in {fv.output}")


# ----------------------------------------------------------------------------- export-lora
def _define_export_lora(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "A LoRA run (config.lora.rank > 0).", flag_values=fv)
    flags.DEFINE_string("output", None, "The new .safetensors file of the adapters (diffusers / PEFT naming).",
                        flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_bool("ema", True, "Export the EMA adapters (--noema: the raw ones).", flag_values=fv)


def _export_lora(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.training import importing

    out = importing.export_lora(fv.workdir, fv.output, use_ema=fv.ema, step=fv.step)
    print(f"exported the rank-{out['rank']} LoRA adapters of step {out['step']} of {fv.workdir} "
          f"({out['tensors']} tensors) to {fv.output}")


# ----------------------------------------------------------------------------- encode-data
def _define_encode(fv: flags.FlagValues) -> None:
    _config_flag(fv, False)
    flags.DEFINE_string("workdir", None, "Instead of --config: a run whose config.json names the autoencoder and data "
                        "(e.g. an imported Stable Diffusion pipeline, with --config.data.name=folder:DIR).",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "The latent cache folder (resumed if it holds a partial cache).", flag_values=fv)
    flags.DEFINE_integer("shard_size", 4096, "Examples per shard file.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "Images encoded per step (split over this process's devices).", flag_values=fv)
    flags.DEFINE_string("text_embeddings", "", "float16 | float32: also store each caption's embedding by the frozen "
                        "config.text.encoder, so a text run on the cache trains without the encoder (float16: half "
                        "the disk; float32: exactly the encoder's output). Empty: captions only.", flag_values=fv)


def _encode_data(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.training.encode_data import encode_data

    if fv.config is None and fv.workdir is None:
        raise errors.UserError("encode-data needs --config (a config file) or --workdir (a run's config.json).")
    config = _config_or_workdirs(fv)
    meta = encode_data(config, fv.output, shard_size=fv.shard_size, batch_size=fv.batch_size,
                       text_embeddings=fv.text_embeddings)
    print(f"encoded {meta['num_examples']} images of {config.data.name} into {fv.output} "
          f"({meta['num_shards']} shards, latents {tuple(meta['latent_shape'])}"
          + (f", {fv.text_embeddings} text embeddings of {config.text.encoder}" if fv.text_embeddings else "") + "); "
          f"train on them with --config.data.name=latents:{fv.output}")


# ----------------------------------------------------------------------------- ema-reconstruct
def _define_ema_reconstruct(fv: flags.FlagValues) -> None:
    _config_flag(fv, False)
    flags.DEFINE_string("workdir", None, "A run trained with config.training.posthoc_ema.", flag_values=fv)
    flags.DEFINE_string("sigma_rel", None, "EMA length(s) to reconstruct, e.g. 0.08 or 0.06,0.08.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Snapshot step to reconstruct at (default: the latest).", flag_values=fv)


def _ema_reconstruct(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.training import posthoc_snapshots

    sigma_rels = posthoc_snapshots.parse_sigma_rels(fv.sigma_rel, "--sigma_rel")
    for info in posthoc_snapshots.reconstruct_run(_config_or_workdirs(fv), fv.workdir, sigma_rels, fv.step):
        print(f"sigma_rel {info['sigma_rel']:g} (gamma {info['gamma']:.3f}) at step {info['step']} from "
              f"{info['snapshots']} snapshots, profile error {100 * info['profile_error']:.2f}%: {info['path']} "
              f"(use it: diffax sample --workdir {fv.workdir} --ema {info['sigma_rel']:g} --output DIR)")


# ----------------------------------------------------------------------------- sweep
def _define_sweep(fv: flags.FlagValues) -> None:
    from diffax import sweep_command as sweep

    sweep.define_flags(fv)


def _sweep(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax import sweep_command as sweep

    sweep.main(fv)


def _default_config():
    """configs/default.py of the diffax checkout (the editable install's repo)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No {path}: pass --config with a base config file.")
    spec = importlib.util.spec_from_file_location("diffax_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# --config.x=y overrides given without --config: applied to the workdir's config.json.
_WORKDIR_OVERRIDES: list[str] = []


def _config_or_workdirs(fv: flags.FlagValues):
    """--config when given, else the config.json the run wrote in --workdir (with any --config.x=y overrides)."""
    from diffax import configuration

    if fv.config is not None:
        return fv.config
    return configuration.apply_overrides(configuration.load(os.path.join(fv.workdir, "config.json")),
                                         _WORKDIR_OVERRIDES)


COMMANDS = {
    c.name: c
    for c in [
        Command("train", "Train the model of a config (resumes the workdir's run).", _define_train, _train,
                required=("workdir",)),
        Command("sample", "Draw samples from a run's checkpoint.", _define_sample, _sample,
                required=("workdir", "output")),
        Command("eval", "Evaluate a run's checkpoints: FID, KID, IS (or a digits feature distance offline).",
                _define_eval, _eval, required=("workdir",)),
        Command("stats", "Compute the reference statistics (mu, sigma) of a config's dataset.", _define_stats, _stats,
                required=("config", "output")),
        Command("prepare-data", "Build the TFDS dataset a config names (needs TensorFlow and the network, once).",
                _define_prepare, _prepare, required=("config",), distributed=False),
        Command("convert-inception", "Convert NVIDIA's inception-2015-12-05.pt or pytorch-fid's .pth to diffax's .npz.",
                _define_nothing, _convert_inception, positional="SRC DST.npz", distributed=False),
        Command("import-diffusers", "Turn a diffusers UNet2DModel checkpoint or Stable Diffusion 1.x / 2.x pipeline "
                "folder into a diffax run (sample or fine-tune).", _define_import, _import_diffusers,
                required=("src", "workdir")),
        Command("export-diffusers", "Write a run's UNet and scheduler in diffusers' format (UNet2DModel or "
                "UNet2DConditionModel).", _define_export, _export_diffusers, required=("workdir", "output"),
                distributed=False),
        Command("export-lora", "Write a LoRA run's adapters as a diffusers / PEFT safetensors file "
                "(pipe.load_lora_weights).", _define_export_lora, _export_lora, required=("workdir", "output"),
                distributed=False),
        Command("encode-data", "Encode a config's data set once with config.autoencoder.path (a latent cache).",
                _define_encode, _encode_data, required=("output",)),
        Command("ema-reconstruct", "Reconstruct a post-hoc EMA of any length from a run's snapshots (EDM2).",
                _define_ema_reconstruct, _ema_reconstruct, required=("workdir", "sigma_rel")),
        Command("sweep", "Run the trials of a config's get_sweep() and report them.", _define_sweep, _sweep,
                required=("config", "workdir"), distributed=False),
    ]
}


def usage() -> str:
    lines = [
        f"usage: {PROG} <command> [--flags]   (also: python -m diffax <command>)",
        "",
        "diffax trains and evaluates diffusion models in JAX from config files.",
        "",
        "commands:",
    ]
    lines += [f"  {c.name:<18} {c.summary}" for c in COMMANDS.values()]
    lines += ["", f"'{PROG} <command> --help' lists a command's flags; --debug shows the traceback of any error.",
              "Example:",
              f"  {PROG} train --config configs/digits.py --workdir runs/digits"]
    return "\n".join(lines)


def _override_error(command: Command, argv: list[str]) -> str | None:
    """Name the first --config.x.y override that is not a field, with the closest valid names."""
    from diffax import configuration

    base = [a for a in argv if not a.startswith("--config.")]
    probe = flags.FlagValues()
    command.define(probe)
    saved, sys.argv = sys.argv, base  # config_flags reads overrides from sys.argv too
    try:
        probe(base)
    except Exception:  # the config file itself is at fault; the caller reports the original error
        return None
    finally:
        sys.argv = saved
    for arg in argv:
        if arg.startswith("--config."):
            error = configuration.field_error(probe.config, arg[len("--config."):].split("=", 1)[0])
            if error:
                return error
    return None


def _config_file(args: list[str]) -> str | None:
    """The file of `--config FILE[:ARG]` (or `--config=...`) in `args`, if given."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            args[i + 1] if arg == "--config" and i + 1 < len(args) else None)
        if value:
            return value.split(":", 1)[0]
    return None


def _add_config_root(args: list[str]) -> None:
    """Put the checkout of the --config file on sys.path (see configuration.add_config_root)."""
    from diffax import configuration

    path = _config_file(args)
    if path:
        configuration.add_config_root(path)


def _fail(message: str, code: int = 2) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _config_file_error(args: list[str]) -> str | None:
    """A --config file that does not exist (config_flags would only say so in a traceback, later)."""
    path = _config_file(args)
    if path and not os.path.isfile(path):
        return (f"--config: no such file {path!r} (from {os.getcwd()}). "
                "Give the path of a config file, e.g. configs/digits.py.")
    return None


def _parse_error(command: Command, argv: list[str], error: Exception) -> str:
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return (f"{_config_file(argv)} has no get_config() function: a config file defines get_config() "
                "(or get_config(arg)) returning an ml_collections.ConfigDict, as configs/default.py does.")
    return _override_error(command, argv) or str(error)


def main() -> None:
    """The `diffax` command: `run` with the host memory set up (diffax/host_memory.py). Tests call `run`
    in-process, where JAX has started already."""
    run(prepare_host=True)


def run(argv: list[str] | None = None, prepare_host: bool = False) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return
    name = argv[1]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        _fail(f"unknown command {name!r}." + (f" Did you mean {close[0]!r}?" if close else "") + f"\n\n{usage()}")
    command = COMMANDS[name]
    fv = flags.FlagValues()
    command.define(fv)
    args = argv[2:]
    if "--help" in args or "-h" in args or "--helpfull" in args:
        print(f"usage: {PROG} {name} {command.positional + ' ' if command.positional else ''}[--flags]\n\n{command.summary}\n\nflags:\n{fv.get_help(include_special_flags=False)}\n")
        return
    debug = "--debug" in args or bool(os.environ.get("DIFFAX_DEBUG"))
    args = [a for a in args if a != "--debug"]
    _add_config_root(args)
    if "config" in fv and (error := _config_file_error(args)):
        _fail(error)
    if "config" in fv and fv["config"].default is None and not any(a == "--config" or a.startswith("--config=") for a in args):
        # No config file: overrides apply to the workdir's config.json (see _config_or_workdirs).
        _WORKDIR_OVERRIDES[:] = [a for a in args if a.startswith("--config.")]
        args = [a for a in args if not a.startswith("--config.")]
    try:
        positional = fv([f"{PROG} {name}"] + args)[1:]
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(_parse_error(command, [f"{PROG} {name}"] + args, e) + f"\nSee '{PROG} {name} --help'.")
    missing = [f"--{f}" for f in command.required if getattr(fv, f) is None]
    if missing:
        _fail(f"{name} needs {', '.join(missing)}. See '{PROG} {name} --help'.")
    if len(positional) != len(command.positional.split()):
        _fail(f"usage: {PROG} {name} {command.positional} [--flags]; got arguments {positional}.".replace("  ", " "))

    logging.set_verbosity(logging.INFO if os.environ.get("DIFFAX_VERBOSE") else logging.WARNING)
    if prepare_host:  # once the input is checked (it imports JAX: 1.5 s), before JAX's CPU client exists
        host_memory.keep_freed_memory()
    if command.distributed:
        from diffax import parallel

        parallel.initialize_distributed()
    try:
        command.main(fv, positional)
    except KeyboardInterrupt:
        _fail("interrupted; the workdir can be resumed from its latest checkpoint.", 130)
    except errors.Stopped as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - user errors become one message; bugs keep their traceback
        if debug or not errors.is_user_error(e):
            raise
        _fail(f"{errors.message(e)}\n(Run again with --debug for the traceback.)", 1)


if __name__ == "__main__":
    run()
