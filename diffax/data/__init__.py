"""Input pipelines: data sources read through Grain into sharded global batches.

    data_shape(config) -> (H, W, C) or (2,)
    make_iterator(config, *, sharding=None, process_index=None, process_count=None) -> DataIterator
    prepare(config)                      `diffax prepare-data` (TFDS -> ArrayRecord)

Sources are chosen by `config.data.name` (see `sources.SOURCES`); the Grain
pipeline is in `pipeline.py`.
"""
from diffax.data import latents  # noqa: F401  (registers the latents: source)
from diffax.data.iterator import DataIterator, data_shape, make_iterator
from diffax.data.prepare import prepare
from diffax.data.sources import SOURCES, TOY2D, BadImageError, Source, get_source

__all__ = [
    "SOURCES",
    "TOY2D",
    "BadImageError",
    "DataIterator",
    "Source",
    "data_shape",
    "get_source",
    "make_iterator",
    "prepare",
]
