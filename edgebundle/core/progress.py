"""Progress inside a stage: loops that run for minutes (training, distillation, quantization-aware
distillation) report each epoch here, and whoever runs the stage (the CLI's progress display) listens.

    with progress.listening(lambda kind, **info: ...):   # the runner, around one stage
        ...
        progress.report("epoch", epoch=3, epochs=30, metric="val_accuracy", value=97.2)   # a loop

Without a listener a report costs nothing. The listener is a context variable, so threads and nested
runs each see their own.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

Listener = Callable[..., None]  # listener(kind, **info)

_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar("edgebundle_progress", default=None)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def report(kind: str, **info: Any) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(kind, **info)
