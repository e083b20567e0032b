"""Calibration data readers. They know nothing about targets: they yield `dict[str, np.ndarray]` feeds.

Data is validated (shape, dtype, NaN/Inf, empty) before the first batch is handed out, so a bad sample
is reported before any scale is computed.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgebundle.errors import DataError
from edgebundle.pipeline.data import Split, check_inputs
from edgebundle.pipeline.recipe import InputSpec


def iter_feeds(split: Split, specs: list[InputSpec], batch: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of `batch` samples each, in order; the last one is shorter when the batch axis is dynamic.

    A static batch dimension forces batch = spec.shape[0], and a trailing remainder is then left out.
    """
    if len(split) == 0:
        raise DataError("calibration data is empty")
    static = {s.shape[0] for s in specs if 0 not in s.dynamic_axes}
    if static:
        batch = static.pop()
    for i in range(0, len(split), batch):
        if static and i + batch > len(split):
            break
        yield {s.name: split.inputs[s.name][i:i + batch] for s in specs}


def run_outputs(session, split: Split, specs: list[InputSpec], batch_hint: int = 64) -> list[np.ndarray]:
    """Every output of a session over a whole split, in order (batches of `batch_hint` where allowed)."""
    parts = [session.run(f) for f in iter_feeds(split, specs, batch_hint)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def run_split(session, split: Split, specs: list[InputSpec], batch_hint: int = 64, output: int = 0) -> np.ndarray:
    """One output of a session (the first by default) over a whole split, in order."""
    return np.concatenate([session.run(f)[output] for f in iter_feeds(split, specs, batch_hint)])


class SplitReader(CalibrationDataReader):
    """onnxruntime.quantization reader over a validated split; re-iterable via `rewind()`."""

    def __init__(self, split: Split, specs: list[InputSpec], batch: int = 1) -> None:
        self.split = Split(check_inputs(split.inputs, specs, what="calibration data"), split.labels)
        self.specs = specs
        self.batch = batch
        self.count = 0
        self._it = iter_feeds(self.split, specs, batch)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._it, None)
        if feed is not None:
            self.count += 1
        return feed

    def rewind(self) -> None:
        """Start over; `count` is the number of feeds served since the last rewind."""
        self._it = iter_feeds(self.split, self.specs, self.batch)
        self.count = 0

    # ORT's strided calibration (`CalibStridedMinMax`) asks for the length and for sub-ranges of feeds
    def __len__(self) -> int:
        return sum(1 for _ in iter_feeds(self.split, self.specs, self.batch))

    def set_range(self, start_index: int, end_index: int) -> None:
        import itertools

        self._it = itertools.islice(iter_feeds(self.split, self.specs, self.batch), start_index, end_index)
