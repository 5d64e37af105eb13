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
    flags.DEFINE_string("output", None, "Folder for samples.npz (uint8 'images', 'labels') and grid.png.", flag_values=fv)
    flags.DEFINE_string("sampler", None, "Sampler name (default: config.sampling.sampler).", flag_values=fv)
    flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sampling.steps).", flag_values=fv)
    flags.DEFINE_integer("num_samples", 64, "How many samples to draw.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the initial noise and the sampler's randomness.", flag_values=fv)
    flags.DEFINE_string("noise", None, "A .npy file of initial noise [num_samples, ...] to start from instead of the seed.", flag_values=fv)
    flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema for the raw weights).", flag_values=fv)


def _sample(fv: flags.FlagValues, args: list[str]) -> None:
    import numpy as np

    from diffax.training import inference
    from diffax.visualize import save_samples

    config = _config_or_workdirs(fv)
    with config.unlocked():
        if fv.sampler is not None:
            config.sampling.sampler = fv.sampler
        if fv.steps is not None:
            config.sampling.steps = fv.steps
    noise = None
    if fv.noise:
        noise = np.load(fv.noise)
        if noise.shape[0] != fv.num_samples:
            raise ValueError(f"--noise {fv.noise} holds {noise.shape[0]} samples but --num_samples={fv.num_samples}.")
    run = inference.load(fv.workdir, step=fv.step, use_ema=fv.ema, config=config)
    out = run.draw(fv.num_samples, fv.seed, noise=noise)
    os.makedirs(fv.output, exist_ok=True)
    np.savez(os.path.join(fv.output, "samples.npz"), **out)
    grid = os.path.join(fv.output, "grid.png")
    save_samples(out["images"][:256], grid, title=f"{fv.num_samples} samples")  # a grid of at most 256
    print(f"{fv.num_samples} samples from step {run.step} ({config.sampling.sampler}, {config.sampling.steps} steps) "
          f"in {fv.output}/samples.npz and {grid}")


# ----------------------------------------------------------------------------- eval, stats, convert-inception
def _define_eval(fv: flags.FlagValues) -> None:
    _config_flag(fv, False)
    flags.DEFINE_string("workdir", None, "The run whose checkpoints to evaluate; results go to <workdir>/eval/.", flag_values=fv)
    flags.DEFINE_enum("checkpoints", "all", ["all", "latest"], "Which checkpoints: all of them or the latest.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Evaluate only the checkpoint at this step.", flag_values=fv)
    flags.DEFINE_bool("watch", False, "Keep waiting for new checkpoints until the run's last step is evaluated.", flag_values=fv)


def _eval(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.evaluation import job

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
    flags.DEFINE_string("src", None, "A diffusers pipeline folder (unet/, scheduler/) or a UNet2DModel folder "
                        "(config.json + diffusion_pytorch_model.safetensors).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "The new run folder: config.json and a step-0 checkpoint.", flag_values=fv)


def _import_diffusers(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax.training import importing

    base = fv.config if fv.config is not None else _default_config()
    config = importing.import_diffusers(fv.src, fv.workdir, base)
    print(f"imported {fv.src} into {fv.workdir} (step 0; {config.diffusion.schedule} schedule, "
          f"{config.diffusion.prediction} prediction). Sample: diffax sample --workdir {fv.workdir} --output DIR; "
          f"fine-tune: diffax train --workdir {fv.workdir}")


# ----------------------------------------------------------------------------- sweep
def _define_sweep(fv: flags.FlagValues) -> None:
    from diffax import sweep

    sweep.define_flags(fv)


def _sweep(fv: flags.FlagValues, args: list[str]) -> None:
    from diffax import sweep

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
    config = configuration.load(os.path.join(fv.workdir, "config.json"))
    apply_overrides(config, _WORKDIR_OVERRIDES)
    return config


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
        Command("convert-inception", "Convert pytorch-fid's Inception weights (.pth) to diffax's .npz (needs torch).",
                _define_nothing, _convert_inception, positional="SRC.pth DST.npz", distributed=False),
        Command("import-diffusers", "Turn a diffusers UNet2DModel checkpoint into a diffax run (sample or fine-tune).",
                _define_import, _import_diffusers, required=("src", "workdir")),
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
    lines += ["", f"'{PROG} <command> --help' lists a command's flags. Example:",
              f"  {PROG} train --config configs/digits.py --workdir runs/digits"]
    return "\n".join(lines)


def _override_error(command: Command, argv: list[str]) -> str | None:
    """Name the first --config.x.y override that is not a field, with the closest valid names."""
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
            error = _field_error(probe.config, arg[len("--config."):].split("=", 1)[0].split("."))
            if error:
                return error
    return None


def _field_error(config, path: list[str]) -> str | None:
    """Why config.<path> is not a field (naming the closest fields), or None if it is one."""
    node, seen = config, "config"
    for part in path:
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=3)
            hint = f" Did you mean {', '.join(seen + '.' + c for c in close)}?" if close else ""
            return f"{seen}.{part} is not a config field.{hint} Fields of {seen}: {', '.join(sorted(keys))}."
        node, seen = node[part], f"{seen}.{part}"
    return None


def apply_overrides(config, overrides: list[str]) -> None:
    """Apply --config.a.b=value overrides to a loaded config, converting each value to its field's type."""
    import ast

    for arg in overrides:
        name, sep, text = arg[len("--config."):].partition("=")
        path = name.split(".")
        error = _field_error(config, path) or (None if sep else f"--config.{name} needs a value: --config.{name}=VALUE.")
        if error:
            raise ValueError(error)
        node = config
        for part in path[:-1]:
            node = node[part]
        old = node[path[-1]]
        try:
            if isinstance(old, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                value = text.lower() in ("true", "1")
            elif isinstance(old, (int, float)):
                value = type(old)(ast.literal_eval(text)) if isinstance(old, float) else int(text)
            elif isinstance(old, tuple):
                value = tuple(ast.literal_eval(text)) if text.strip() not in ("", "()") else ()
            else:
                value = text
        except (ValueError, SyntaxError, TypeError) as e:
            raise ValueError(f"--config.{name}={text}: expected a value of type {type(old).__name__} ({e}).") from None
        with config.unlocked():
            node[path[-1]] = value


def _add_config_root(args: list[str]) -> None:
    """Make `from configs import default` work in a config file wherever diffax runs from:
    the nearest folder above the config file that holds `configs/` goes on sys.path."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            args[i + 1] if arg == "--config" and i + 1 < len(args) else None)
        if value:
            folder = os.path.dirname(os.path.abspath(value.split(":", 1)[0]))
            while not os.path.isdir(os.path.join(folder, "configs")) and os.path.dirname(folder) != folder:
                folder = os.path.dirname(folder)  # experiments/x/config.py imports configs/ from the repo root
            if folder not in sys.path:
                sys.path.insert(0, folder)


def _fail(message: str, code: int = 2) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def run(argv: list[str] | None = None) -> None:
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
    _add_config_root(args)
    if "config" in fv and fv["config"].default is None and not any(a == "--config" or a.startswith("--config=") for a in args):
        # No config file: overrides apply to the workdir's config.json (see _config_or_workdirs).
        _WORKDIR_OVERRIDES[:] = [a for a in args if a.startswith("--config.")]
        args = [a for a in args if not a.startswith("--config.")]
    try:
        positional = fv([f"{PROG} {name}"] + args)[1:]
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _fail((_override_error(command, [f"{PROG} {name}"] + args) or str(e)) + f"\nSee '{PROG} {name} --help'.")
    missing = [f"--{f}" for f in command.required if getattr(fv, f) is None]
    if missing:
        _fail(f"{name} needs {', '.join(missing)}. See '{PROG} {name} --help'.")
    if len(positional) != len(command.positional.split()):
        _fail(f"usage: {PROG} {name} {command.positional} [--flags]; got arguments {positional}.".replace("  ", " "))

    logging.set_verbosity(logging.INFO if os.environ.get("DIFFAX_VERBOSE") else logging.WARNING)
    if command.distributed:
        from diffax import parallel

        parallel.initialize_distributed()
    try:
        command.main(fv, positional)
    except KeyboardInterrupt:
        _fail("interrupted; the workdir can be resumed from its latest checkpoint.", 130)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        if os.environ.get("DIFFAX_DEBUG"):
            raise
        _fail(f"{e}\n(set DIFFAX_DEBUG=1 for the full traceback)", 1)


if __name__ == "__main__":
    run()
