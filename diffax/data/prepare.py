"""`diffax prepare-data`: build a TFDS dataset in ArrayRecord format for `tfds.data_source`."""
from __future__ import annotations

import logging
import socket
import urllib.error

from diffax.data import sources

log = logging.getLogger(__name__)


def _missing_module(error: BaseException) -> str | None:
    """The top-level name of a module whose import failed in `error`'s chain of causes, if any."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name:
            return error.name.split(".")[0]
        error = error.__cause__ or error.__context__
    return None


def _needs_tensorflow(name: str, data_dir: str) -> RuntimeError:
    return RuntimeError(
        f"Preparing TFDS dataset {name!r} needs TensorFlow (its builder encodes images with it), "
        "which is not installed. Install it with\n  pip install tensorflow\n"
        f"then rerun `diffax prepare-data`. Files already downloaded stay in {data_dir}/downloads. "
        "Training reads the prepared ArrayRecord files without TensorFlow."
    )


def _network_failure(error: BaseException) -> BaseException | None:
    """The connection error in `error`'s chain of causes, if there is one."""
    while error is not None:
        if isinstance(error, (ConnectionError, socket.gaierror, socket.timeout, urllib.error.URLError)):
            return error
        if type(error).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "DownloadError"):
            return error  # requests / tfds download errors, without importing requests
        error = error.__cause__ or error.__context__
    return None


def prepare(config) -> None:
    """Builds the `tfds:NAME[/CONFIG]` dataset of `config.data.name` in ArrayRecord format.

    Runs the dataset's TFDS builder (`download_and_prepare(file_format="array_record")`)
    into `config.data.data_dir` (or the TFDS default). Most builders need
    TensorFlow to encode images and the network to download the raw files; when
    either is missing the error says so and how to fix it. Other sources need
    no preparation: they are only checked to be readable.
    """
    prefix, name = sources.split_name(config.data.name)
    if prefix != "tfds":
        source = sources.get_source(config)
        log.info("%s needs no preparation (%s examples).", source.name,
                 "endless" if source.records is None else len(source.records))
        return
    if not name:
        raise ValueError("config.data.name='tfds:NAME[/CONFIG]' needs a dataset name, e.g. tfds:cifar10.")
    import tensorflow_datasets as tfds

    data_dir = config.data.data_dir or sources.tfds_default_data_dir()
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"{name!r} (config.data.name) is not a TFDS dataset; see "
            "https://www.tensorflow.org/datasets/catalog/overview for the names."
        ) from e
    if builder.is_prepared():
        log.info("TFDS dataset %s is already prepared in %s.", name, builder.data_dir)
        return
    log.info("Preparing TFDS dataset %s in %s (ArrayRecord).", name, builder.data_dir)
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # noqa: BLE001 -- re-raised with what is missing, never swallowed
        missing = _missing_module(e)
        if missing in ("tensorflow", "tf"):
            raise _needs_tensorflow(name, data_dir) from e
        if missing:
            raise RuntimeError(
                f"Preparing TFDS dataset {name!r} needs the Python module {missing!r}, which is not installed: "
                f"pip install {missing.replace('_', '-')}"
            ) from e
        failure = _network_failure(e)
        if failure is not None:
            raise RuntimeError(
                f"Preparing TFDS dataset {name!r} needs to download its source files, and the download "
                f"failed ({type(failure).__name__}: {failure}). Run `diffax prepare-data` (or "
                f"`tfds build {name} --file_format=array_record --data_dir={data_dir}`) on a machine with "
                f"network access and copy {data_dir}/{builder.info.full_name} here, keeping the same path "
                "under config.data.data_dir."
            ) from e
        raise
    log.info("Prepared %s: %s", name, {k: v.num_examples for k, v in builder.info.splits.items()})
