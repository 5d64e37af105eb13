"""diffax: diffusion models in JAX and Flax NNX.

The diffusion math (`schedules`, `parameterization`, `objectives`, `samplers`)
is pure functions of arrays; models, data and training plug into it.
"""

__version__ = "0.1.0"
