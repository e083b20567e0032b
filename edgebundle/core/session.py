"""Sessions: an opened runtime artifact that runs feeds. Every target's session is a context manager and
declares its optional features instead of being probed with `hasattr`:

- "inference_precision": `session.inference_precision` says what precision the runtime computes in;
- "gpu_timing": `session.gpu_samples_ms(feeds, warmup=, iterations=)` times on the device's own clock.

`OrtSession` (ONNX Runtime CPU) lives here because export parity, evaluation and several targets use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from edgebundle.core.device_runner import ort_session
from edgebundle.core.errors import StageError



class SessionBase:
    """Context-manager plumbing and the declared optional features; subclasses define run and close."""

    features: ClassVar[frozenset[str]] = frozenset()
    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OrtSession(SessionBase):
    def __init__(self, model_path: Path, *, threads: int, level: str = "all") -> None:
        try:
            self.sess = ort_session(model_path, threads, level)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise StageError(f"onnxruntime cannot load {model_path.name}: {e}") from e
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, feeds)

    def close(self) -> None:
        self.sess = None
