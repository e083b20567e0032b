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
import onnxruntime as ort

from edgebundle.core.errors import StageError

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


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
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = _OPT_LEVELS[level]
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise StageError(f"onnxruntime cannot load {model_path.name}: {e}") from e
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, feeds)

    def close(self) -> None:
        self.sess = None
