"""Reading what a training run wrote, for the tests that drive `diffax train` in subprocesses."""
import json
import os


def losses(workdir) -> dict[int, float]:
    """step -> logged loss from metrics.jsonl (the last line for a step wins)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out


def final_state(workdir, step=None):
    """The whole train state (weights, EMA, optimizer, step) of a checkpoint as numpy arrays, by path."""
    import jax
    import numpy as np

    from diffax import configuration, parallel
    from diffax.training import checkpoint
    from diffax.training.build import build
    from diffax.training.step import state_layout

    config = configuration.load(os.path.join(workdir, "config.json"))
    _, abstract, shardings = state_layout(build(config), config, parallel.make_mesh(config.mesh))
    ckpt = checkpoint.Checkpointer(str(workdir), 10, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        state = ckpt.restore(step, checkpoint.abstract_like(abstract, shardings))
    finally:
        ckpt.close()
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_same_state(a, b):
    """Bit-identical train states (every array equal, exactly)."""
    import numpy as np

    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def checkpoint_steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
