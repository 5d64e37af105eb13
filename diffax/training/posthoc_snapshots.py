"""Post-hoc EMA on disk: profile snapshots written during training, and the EMAs reconstructed from them.

    <workdir>/posthoc_ema/snapshots/<step>/           the power-function EMA profiles at that step (Orbax),
                                                      with meta (sigma_rels, gammas); never deleted
    <workdir>/posthoc_ema/sigma_rel_0.0800/<step>/    a reconstructed EMA (`diffax ema-reconstruct`), params

The math is in `posthoc_ema.py` (Karras et al. 2024, EDM2, App. C.2); this
module only lists, saves and restores, and combines snapshots one at a time so
memory holds one snapshot and the running sum, whatever the number of snapshots.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffax.training import posthoc_ema


def root_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "posthoc_ema")


def snapshot_dir(workdir: str) -> str:
    return os.path.join(root_dir(workdir), "snapshots")


def named_dir(workdir: str, sigma_rel: float) -> str:
    """Folder of the EMA reconstructed for `sigma_rel` (one Orbax step folder per training step)."""
    return os.path.join(root_dir(workdir), f"sigma_rel_{float(sigma_rel):.4f}")


def check_config(t: Any) -> None:
    """Reject a bad config.training.posthoc_ema / posthoc_ema_every before training starts."""
    if not t.posthoc_ema:
        return
    try:
        posthoc_ema.check_sigma_rel(list(t.posthoc_ema))
    except ValueError as e:
        raise ValueError(f"config.training.posthoc_ema={tuple(t.posthoc_ema)}: {e}") from None
    every, k = int(t.posthoc_ema_every), int(t.steps_per_dispatch)
    if every <= 0 or every % k:
        raise ValueError(f"config.training.posthoc_ema_every={every}: must be a positive multiple of "
                         f"config.training.steps_per_dispatch={k}.")


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays of a pytree (global shapes): what one snapshot's arrays take on disk."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _manager(path: str, async_save: bool = False) -> ocp.CheckpointManager:
    # Its own barrier names: a snapshot and a checkpoint of the same step are saved at once, and with one
    # shared prefix the second save's "_async_write_complete.<step>" barrier collides with the first's
    # on a multi-process run.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="posthoc_ema"))
    return ocp.CheckpointManager(path, options=options)


class Snapshotter:
    """Saves the train state's profiles every `every` steps and at `num_steps` (asynchronously, like checkpoints)."""

    def __init__(self, workdir: str, sigma_rels: Sequence[float], every: int, num_steps: int):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [float(g) for g in posthoc_ema.gamma_of_sigma_rel(self.sigma_rels)]
        self.every, self.num_steps = int(every), int(num_steps)
        self.path = snapshot_dir(workdir)
        self.manager = _manager(self.path, async_save=True)

    def describe(self, abstract_profiles: Any) -> str:
        """The log line with the disk cost: bytes of one snapshot and of all the run's snapshots."""
        size = tree_bytes(abstract_profiles)
        count = -(-self.num_steps // self.every)
        return (f"diffax: post-hoc EMA sigma_rel {self.sigma_rels}: a snapshot every {self.every} steps of "
                f"{size} bytes ({size / 2**20:.2f} MiB), {count} snapshots {count * size / 2**20:.1f} MiB, in {self.path}")

    def maybe_save(self, step: int, state: Any) -> None:
        if step % self.every and step != self.num_steps:
            return
        if step in self.manager.all_steps():  # re-done after a resume from an older checkpoint: same values
            return
        meta = {"step": int(step), "sigma_rel": self.sigma_rels, "gamma": self.gammas}
        self.manager.save(step, args=ocp.args.Composite(profiles=ocp.args.PyTreeSave(state.posthoc_ema),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def snapshot_steps(workdir: str) -> list[int]:
    """Steps of the complete snapshots in a workdir, oldest first."""
    path = snapshot_dir(workdir)
    return sorted(ocp.utils.checkpoint_steps(path)) if os.path.isdir(path) else []


def reconstruct(workdir: str, sigma_rel: float, abstract_profiles: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """The power-function EMA of length `sigma_rel` at snapshot `step` (default: the latest), from the snapshots.

    Solves EDM2's least-squares problem (App. C.2) over every profile of every
    snapshot up to `step`, then sums the snapshots with those coefficients.
    `abstract_profiles` (the abstract TrainState's posthoc_ema with shardings)
    says where the arrays go. Returns (step, params, info). A sigma_rel the
    snapshots cannot represent (profile error above posthoc_ema.MAX_PROFILE_ERROR)
    is a ValueError that states the range they can.
    """
    posthoc_ema.check_sigma_rel(sigma_rel)
    steps = snapshot_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"No post-hoc EMA snapshots in {snapshot_dir(workdir)}: train with "
            "--config.training.posthoc_ema='(0.05,0.1)' to keep them.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"No post-hoc EMA snapshot at step {step} in {workdir}; snapshot steps: "
                         f"{steps[0]} to {steps[-1]} ({len(steps)} snapshots, e.g. {steps[-3:]}).")
    used = [s for s in steps if s <= step]
    manager = _manager(snapshot_dir(workdir))
    try:
        metas = [manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] for s in used]
        ts = [s for s, m in zip(used, metas) for _ in m["gamma"]]
        gs = [g for m in metas for g in m["gamma"]]
        gamma = float(posthoc_ema.gamma_of_sigma_rel(sigma_rel))
        coefficients, error = posthoc_ema.solve_coefficients(ts, gs, step, gamma)
        if error > posthoc_ema.MAX_PROFILE_ERROR:
            lo, hi = posthoc_ema.representable_range(ts, gs, step)
            tracked = sorted({v for m in metas for v in m["sigma_rel"]})
            raise ValueError(
                f"sigma_rel={sigma_rel:g} cannot be reconstructed at step {step} from the {len(used)} snapshots of "
                f"sigma_rel {tracked}: the closest combination's profile is {100 * error:.0f}% off (limit "
                f"{100 * posthoc_ema.MAX_PROFILE_ERROR:.0f}%). These snapshots represent sigma_rel from {lo:.3f} "
                f"to {hi:.3f} at step {step}; shorter ones need more frequent snapshots (config.training.posthoc_ema_every), longer ones a longer tracked sigma_rel.")
        total, i = None, 0
        for s, m in zip(used, metas):
            profiles = manager.restore(
                s, args=ocp.args.Composite(profiles=ocp.args.PyTreeRestore(abstract_profiles)))["profiles"]
            n = len(m["gamma"])
            part = posthoc_ema.combine(profiles, coefficients[i:i + n])
            total = part if total is None else jax.tree.map(lambda a, b: a + b, total, part)
            i += n
    finally:
        manager.close()
    params = jax.tree.map(lambda a, like: a.astype(like.dtype), total, abstract_profiles[0])
    info = {"step": int(step), "sigma_rel": float(sigma_rel), "gamma": gamma, "profile_error": error,
            "snapshots": len(used)}
    return step, params, info


def save_named(workdir: str, step: int, params: Any, info: dict) -> str:
    """Write a reconstructed EMA under named_dir(workdir, sigma_rel)/<step>; returns that folder."""
    manager = _manager(named_dir(workdir, info["sigma_rel"]))
    try:
        if step in manager.all_steps():
            manager.delete(step)
        manager.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params), meta=ocp.args.JsonSave(info)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return os.path.join(named_dir(workdir, info["sigma_rel"]), str(step))


def load(workdir: str, sigma_rel: float, abstract_params: Any, abstract_profiles: Any,
         step: int | None = None) -> tuple[int, Any]:
    """The EMA of length `sigma_rel` at `step` (default: the latest snapshot): read if reconstructed before, else
    reconstructed now and saved as a named EMA of the run."""
    if step is None:
        steps = snapshot_steps(workdir)
        step = steps[-1] if steps else None
    path = named_dir(workdir, sigma_rel)
    if step is not None and os.path.isdir(path) and step in ocp.utils.checkpoint_steps(path):
        manager = _manager(path)
        try:
            params = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.PyTreeRestore(abstract_params)))["params"]
        finally:
            manager.close()
        return step, params
    step, params, info = reconstruct(workdir, sigma_rel, abstract_profiles, step)
    save_named(workdir, step, params, info)
    return step, params


def parse_sigma_rels(text: str, flag: str) -> list[float]:
    """'0.03,0.05,0.08' -> [0.03, 0.05, 0.08], each checked; a bad entry is an error naming `flag`."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected sigma_rel values separated by commas, e.g. 0.05,0.08,0.12.") from None
    if not values:
        raise ValueError(f"{flag} is empty: give one or more sigma_rel values, e.g. 0.05,0.08,0.12.")
    try:
        posthoc_ema.check_sigma_rel(values)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    return values


def reconstruct_run(config: Any, workdir: str, sigma_rels: Sequence[float], step: int | None = None) -> list[dict]:
    """`diffax ema-reconstruct`: reconstruct and save each sigma_rel's EMA at `step`; returns their infos."""
    from diffax import parallel
    from diffax.training import checkpoint
    from diffax.training.build import build
    from diffax.training.step import state_layout

    mesh = parallel.make_mesh(config.mesh)
    from diffax.training.text import trained_on_cached_embeddings

    diffusion = build(config, cached_text=trained_on_cached_embeddings(workdir))
    _, abstract, shardings = state_layout(diffusion, config, mesh)
    if not abstract.posthoc_ema:
        raise ValueError(f"The config of {workdir} has no config.training.posthoc_ema, so its train state has no "
                         "post-hoc EMA profiles to reconstruct from.")
    target = checkpoint.abstract_like(abstract.posthoc_ema, shardings.posthoc_ema)
    infos = []
    for sigma_rel in sigma_rels:
        s, params, info = reconstruct(workdir, sigma_rel, target, step)
        info["path"] = save_named(workdir, s, params, info)
        infos.append(info)
    return infos
