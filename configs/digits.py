"""The offline default: a small UNet on scikit-learn's bundled 8x8 digits at their native size.

Needs no download and trains on a 2-core CPU in about 4 minutes:
    diffax train --config configs/digits.py --workdir runs/digits
The same network trained by flow matching (rectified flow, velocity target; configs/flow_matching.py):
    diffax train --config configs/digits.py:flow --workdir runs/digits_flow
Padding to 16x16 (`--config.data.image_size=16`) costs about 4x the compute on a
CPU for no extra detail.
"""
from configs import default, flow_matching


def get_config(variant: str = ""):
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8  # native size; "pad" centres smaller images in a larger square
    config.data.resize = "pad"
    config.data.channels = 1
    config.model.channels = 32
    config.model.channel_mult = (1, 2)
    config.model.attention_resolutions = (4,)
    config.training.batch_size = 64
    config.training.num_steps = 2000
    config.training.log_every = 200
    config.training.checkpoint_every = 1000
    config.training.sample_every = 1000
    if variant == "flow":
        return flow_matching.rectified_flow(config)
    if variant:
        raise ValueError(f"configs/digits.py:{variant}: the only variant is 'flow' (configs/digits.py:flow).")
    return config
