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
    main: Callable[[flags.FlagValues], None]
    config_required: bool = True


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
    _config_flag(fv, True)
    flags.DEFINE_string("workdir", None, "Run folder: config, checkpoints, logs and samples. Resumed if it holds a run.", flag_values=fv)
    flags.DEFINE_bool("force", False, "Resume even if the workdir's run has a different config (the old config is kept).", flag_values=fv)


def _train(fv: flags.FlagValues) -> None:
    from diffax.training import trainer

    trainer.train(fv.config, fv.workdir, force=fv.force)


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


def _sample(fv: flags.FlagValues) -> None:
    import numpy as np

    from diffax import configuration
    from diffax.training import inference
    from diffax.visualize import image_grid, save_png, save_scatter

    config = fv.config
    if config is None:
        config = configuration.load(os.path.join(fv.workdir, "config.json"))
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
    if len(run.diffusion.data_shape) == 1:
        save_scatter(out["images"], out["images"], grid, title=f"{fv.num_samples} samples")
    else:
        save_png(image_grid(out["images"][:256]), grid, scale=max(1, 128 // run.diffusion.data_shape[0]))
    print(f"{fv.num_samples} samples from step {run.step} ({config.sampling.sampler}, {config.sampling.steps} steps) "
          f"in {fv.output}/samples.npz and {grid}")


COMMANDS = {
    c.name: c
    for c in [
        Command("train", "Train the model of a config (resumes the workdir's run).", _define_train, _train),
        Command("sample", "Draw samples from a run's checkpoint.", _define_sample, _sample, config_required=False),
    ]
}

REQUIRED = {"train": ("config", "workdir"), "sample": ("workdir", "output")}


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
    config = probe.config
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node, seen = config, "config"
        for part in path:
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=3)
                hint = f" Did you mean {', '.join(seen + '.' + c for c in close)}?" if close else ""
                return f"{seen}.{part} is not a config field.{hint} Fields of {seen}: {', '.join(sorted(keys))}."
            node, seen = node[part], f"{seen}.{part}"
    return None


def _add_config_root(args: list[str]) -> None:
    """Make `from configs import default` work in a config file wherever diffax runs from:
    the folder holding the config's `configs/` package goes on sys.path."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            args[i + 1] if arg == "--config" and i + 1 < len(args) else None)
        if value:
            root = os.path.dirname(os.path.dirname(os.path.abspath(value.split(":", 1)[0])))
            if root not in sys.path:
                sys.path.insert(0, root)


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
        print(f"usage: {PROG} {name} [--flags]\n\n{command.summary}\n\nflags:\n{fv.get_help(include_special_flags=False)}\n")
        return
    _add_config_root(args)
    try:
        fv([f"{PROG} {name}"] + args)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _fail((_override_error(command, [f"{PROG} {name}"] + args) or str(e)) + f"\nSee '{PROG} {name} --help'.")
    missing = [f"--{f}" for f in REQUIRED.get(name, ()) if getattr(fv, f) is None]
    if missing:
        _fail(f"{name} needs {', '.join(missing)}. See '{PROG} {name} --help'.")

    logging.set_verbosity(logging.INFO if os.environ.get("DIFFAX_VERBOSE") else logging.WARNING)
    from diffax import parallel

    parallel.initialize_distributed()
    try:
        command.main(fv)
    except KeyboardInterrupt:
        _fail("interrupted; the workdir can be resumed from its latest checkpoint.", 130)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        if os.environ.get("DIFFAX_DEBUG"):
            raise
        _fail(f"{e}\n(set DIFFAX_DEBUG=1 for the full traceback)", 1)


if __name__ == "__main__":
    run()
