"""Where metrics go: metrics.jsonl, TensorBoard event files (no TensorFlow needed) and the console.

Only process 0 writes; on other processes every method does nothing.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


class MetricWriter:
    """Appends scalars to `<workdir>/metrics.jsonl` and TensorBoard; images to TensorBoard."""

    def __init__(
        self,
        workdir: str,
        *,
        resume_step: int | None = None,
        tensorboard_subdir: str = "tb",
        jsonl_name: str = "metrics.jsonl",
    ):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter  # writes event files without TensorFlow

        path = os.path.join(workdir, jsonl_name)
        if resume_step is not None:
            _drop_lines_after(path, resume_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(workdir, tensorboard_subdir))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
        """One HWC uint8 image (e.g. a sample grid) in TensorBoard."""
        if not self.active:
            return
        self._tb.add_image(tag, image_uint8, step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _drop_lines_after(path: str, step: int) -> None:
    """Forget metrics logged after `step` by a run that was killed before its next checkpoint:
    the resumed run logs those steps again."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            pass  # a line cut short by the kill
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
