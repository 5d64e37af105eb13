"""A small MLP on a 2-D distribution (default: 8 Gaussians); trains in under a minute on a CPU.

    diffax train --config configs/toy2d.py --workdir runs/toy2d
    diffax train --config configs/toy2d.py:checkerboard --workdir runs/checkerboard
    diffax train --config configs/toy2d.py:flow --workdir runs/toy2d_flow
    diffax train --config configs/toy2d.py:flow,moons --workdir runs/moons_flow

The argument names the distribution: moons, swiss_roll, 8gaussians, checkerboard, gmm; a
`flow` in it (comma-separated) trains by flow matching instead (configs/flow_matching.py).
"""
from configs import default, flow_matching


def get_config(arg: str = "8gaussians"):
    parts = [p for p in arg.split(",") if p]
    distributions = [p for p in parts if p != "flow"] or ["8gaussians"]
    config = default.get_config()
    config.data.name = f"toy2d:{distributions[0]}"
    config.data.conditional = False
    config.model.name = "mlp"
    config.model.hidden = 128
    config.model.layers = 3
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 100
    config.training.num_steps = 2000
    config.training.batch_size = 512
    config.training.log_every = 200
    config.training.checkpoint_every = 1000
    config.training.sample_every = 0
    config.training.ema_decay = 0.995
    config.sampling.sampler = "ddim"
    config.sampling.steps = 50
    config.sampling.num_samples = 2000
    config.sampling.batch_size = 2000
    return flow_matching.rectified_flow(config) if "flow" in parts else config
