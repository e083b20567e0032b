"""A time limit on user code (a model factory, a data function, a metric function, the import of their
module), so a call that never returns ends the run with a line that names it instead of hanging it.

The limit is a real-time interval timer (SIGALRM), so it applies in the main thread of a Unix process,
which is where edgebundle runs user code; elsewhere (another thread, Windows) the call runs unlimited.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from edgebundle.core.errors import RecipeError

DEFAULT_USER_CODE_S = 600.0


class _Expired(BaseException):
    """Raised inside the user's call when its time is up (a BaseException, so user code's own
    `except Exception` cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(_signum, _frame):
        raise _Expired()

    previous = signal.signal(signal.SIGALRM, expire)
    remaining, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired as e:
        raise RecipeError(f"{what} did not return within {seconds:g} s (limits.user_code_s); it may hang, or "
                          "raise the limit in the recipe") from e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:  # an outer limit was running: give it back what is left of it (approximately)
            signal.setitimer(signal.ITIMER_REAL, max(remaining - seconds, 0.001))
