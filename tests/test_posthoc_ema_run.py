"""Post-hoc EMA end to end through the `diffax` command: snapshots during training (kept whatever
keep_checkpoints says), bit-identical profiles after a SIGKILL and resume, `diffax ema-reconstruct`
against the snapshots combined by hand, `sample --ema`; 2 processes and fsdp over 8 devices (slow)."""
import os
import signal
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffax.training import posthoc_ema, posthoc_snapshots

from test_training import STEPS, run_diffax, signal_when, start_diffax, toy_args

EVERY = 4
POSTHOC = ["--config.training.posthoc_ema=(0.05,0.1)", f"--config.training.posthoc_ema_every={EVERY}",
           "--config.training.keep_checkpoints=1"]


def restore(path, step, item):
    """An Orbax item as a list of numpy leaves, whatever devices saved it."""
    folder = os.path.join(path, str(step), item)
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(folder).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = checkpointer.restore(folder, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def snapshot_steps(workdir):
    return sorted(int(s) for s in os.listdir(workdir / "posthoc_ema" / "snapshots") if s.isdigit())


def profiles(workdir, step):
    return restore(str(workdir / "posthoc_ema" / "snapshots"), step, "profiles")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("posthoc")
    r = run_diffax(toy_args(workdir, *POSTHOC))
    assert "post-hoc EMA sigma_rel [0.05, 0.1]: a snapshot every 4 steps of" in r.stdout
    return workdir


def test_snapshots_are_kept_whatever_keep_checkpoints_says(reference):
    assert sorted(int(s) for s in os.listdir(reference / "checkpoints") if s.isdigit()) == [STEPS]
    assert snapshot_steps(reference) == list(range(EVERY, STEPS + 1, EVERY))
    # The last snapshot holds the train state's profiles; the two lengths differ.
    state = restore(str(reference / "checkpoints"), STEPS, "state")
    last = profiles(reference, STEPS)
    n = len(last) // 2
    assert any(np.array_equal(last[0], a) for a in state) and any(np.array_equal(last[n], a) for a in state)
    assert not np.allclose(last[0], last[n])


def snapshot_started(workdir, step):
    """True once Orbax has begun writing the post-hoc snapshot of `step`."""
    folder = os.path.join(workdir, "posthoc_ema", "snapshots")
    return os.path.isdir(folder) and any(n == str(step) or n.startswith(f"{step}.") for n in os.listdir(folder))


# Killed from outside as soon as the snapshot of step 16 starts to be written.
@pytest.mark.slow  # a killed and a resumed CLI run; the profiles live in the TrainState, whose SIGKILL resume test_training.py checks
def test_sigkill_then_resume_gives_bit_identical_profiles(reference, tmp_path):
    code, out = signal_when(start_diffax(toy_args(tmp_path, *POSTHOC)), lambda: snapshot_started(tmp_path, 16),
                            signal.SIGKILL)
    assert code == -9, out
    run_diffax(toy_args(tmp_path, *POSTHOC))
    assert snapshot_steps(tmp_path) == snapshot_steps(reference)
    for step in snapshot_steps(reference):
        for a, b in zip(profiles(tmp_path, step), profiles(reference, step)):
            np.testing.assert_array_equal(a, b)


def reconstruct_by_hand(workdir, sigma_rel, step):
    """The snapshots up to `step` combined in float64 with EDM2's least-squares coefficients."""
    steps = [s for s in snapshot_steps(workdir) if s <= step]
    gammas = posthoc_ema.gamma_of_sigma_rel([0.05, 0.1])
    x, _ = posthoc_ema.solve_coefficients(np.repeat(steps, 2), np.tile(gammas, len(steps)), step,
                                          float(posthoc_ema.gamma_of_sigma_rel(sigma_rel)))
    total = None
    for i, s in enumerate(steps):
        leaves = profiles(workdir, s)
        n = len(leaves) // 2
        term = [x[2 * i] * leaves[j].astype(np.float64) + x[2 * i + 1] * leaves[n + j] for j in range(n)]
        total = term if total is None else [a + b for a, b in zip(total, term)]
    return total


def check_reconstruction(workdir, step, devices=1):
    r = run_diffax(["ema-reconstruct", "--workdir", str(workdir), "--sigma_rel", "0.08", "--step", str(step)],
                   devices=devices)
    assert f"sigma_rel 0.08 (gamma 9.45" in r.stdout and f"at step {step}" in r.stdout
    saved = restore(str(workdir / "posthoc_ema" / "sigma_rel_0.0800"), step, "params")
    for a, b in zip(saved, reconstruct_by_hand(workdir, 0.08, step)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the CLI over the same reconstruction the in-process tests check: ~15 s
def test_reconstruct_command_sample_and_range_error(reference, tmp_path):
    check_reconstruction(reference, 20)
    with pytest.raises(ValueError, match=r"sigma_rel=0.005 cannot be reconstructed at step 24 .* represent sigma_rel "
                                         r"from 0\.0\d\d to 0\.1\d\d at step 24"):
        posthoc_snapshots.reconstruct(str(reference), 0.005, abstract_profiles=None)
    r = run_diffax(["sample", "--workdir", str(reference), "--output", str(tmp_path), "--num_samples", "16",
                    "--steps", "3", "--ema", "0.08", "--step", "20"])
    assert "16 samples from step 20" in r.stdout
    assert np.isfinite(np.load(tmp_path / "samples.npz")["images"]).all()


@pytest.mark.slow  # another training run and reconstruction on 8 simulated devices
def test_fsdp_over_eight_devices(reference, tmp_path):
    fsdp = ["--config.mesh.fsdp=8", "--config.mesh.data=1", "--config.mesh.fsdp_min_size=64"]
    run_diffax(toy_args(tmp_path, *POSTHOC, *fsdp), devices=8)
    for a, b in zip(profiles(tmp_path, STEPS), profiles(reference, STEPS)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    check_reconstruction(tmp_path, STEPS, devices=8)


# 2 processes x 2 devices train, then reconstruct together. A snapshot and a checkpoint of the same step
# are saved at once: this caught their Orbax barriers colliding (a hang at the last step).
@pytest.mark.slow  # 20-50 s on 2 cores; the 2-process training itself is in test_multihost.py (slow too)
def test_two_processes(reference, tmp_path):
    from test_multihost import check_ok, launch

    workdir = tmp_path / "run"
    check_ok(launch(tmp_path, workdir, 2, 2, "train", args=toy_args(workdir, *POSTHOC)))
    for a, b in zip(profiles(workdir, STEPS), profiles(reference, STEPS)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    args = ["ema-reconstruct", "--workdir", str(workdir), "--sigma_rel", "0.08"]
    check_ok(launch(tmp_path, workdir, 2, 2, "reconstruct", args=args))
    saved = restore(str(workdir / "posthoc_ema" / "sigma_rel_0.0800"), STEPS, "params")
    for a, b in zip(saved, reconstruct_by_hand(workdir, 0.08, STEPS)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
