"""Rows made on access: what a data split holds where the data need not fit in memory."""

from __future__ import annotations

from typing import Callable

import numpy as np

MAX_CLASS = 2 ** 31 - 1  # a label past it is no class index (and would wrap when cast to int64)


class LazyRows:
    """An input's rows, made on access by `make(row_numbers)` (e.g. decoding those image files): indexing
    with an int, a slice or an index array makes just those rows; `view` selects rows without making any;
    `np.asarray` makes them all. `fingerprint` stands for the content (the files' bytes and preprocessing).
    `pack(row_numbers)`, where given, stores those rows more compactly than the made arrays (an image's file
    bytes instead of its decoded float32 pixels): arrays that the source's `unpack` turns back into rows."""

    def __init__(self, make: Callable[[np.ndarray], np.ndarray], sample_shape: tuple[int, ...], dtype,
                 rows: np.ndarray, fingerprint: str,
                 pack: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None) -> None:
        self.make, self.sample_shape, self.dtype = make, tuple(sample_shape), np.dtype(dtype)
        self.rows, self.fingerprint, self.pack = np.asarray(rows, np.int64), fingerprint, pack

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.make(self.rows[[int(key)]])[0]
        return self.make(self.rows[np.asarray(key) if not isinstance(key, slice) else key])

    def view(self, idx) -> LazyRows:
        return LazyRows(self.make, self.sample_shape, self.dtype, self.rows[idx], self.fingerprint, self.pack)

    def packed(self) -> dict[str, np.ndarray] | None:
        """These rows in the source's compact form, or None where the source has none."""
        return None if self.pack is None else self.pack(self.rows)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.make(self.rows) if len(self.rows) else np.empty(self.shape, self.dtype)
        return out if dtype is None else out.astype(dtype)
