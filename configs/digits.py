"""The offline default: a small UNet on scikit-learn's bundled 8x8 digits, padded to 16x16.

Needs no download and trains on a 2-core CPU in a few minutes:
    diffax train --config configs/digits.py --workdir runs/digits
"""
from configs import default


def get_config():
    config = default.get_config()
    return config
