"""Calibration data readers. They know nothing about targets: they yield `dict[str, np.ndarray]` feeds.

Data is validated (shape, dtype, NaN/Inf, empty) before the first batch is handed out, so a bad sample
is reported before any scale is computed.
"""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgebundle.core.data import Split, check_inputs, iter_feeds, run_outputs, run_split  # noqa: F401  (re-exported)
from edgebundle.core.recipe import InputSpec


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
