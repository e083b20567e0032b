"""A time limit on user code (a model factory, a data function, a metric function, the import of their
module), so a call that never returns ends the run with a line that names it instead of hanging it.

The limit is a real-time interval timer (SIGALRM), so it applies in the main thread of a Unix process,
which is where edgebundle runs user code; elsewhere (another thread, Windows) the call runs unlimited.
Code that catches the stop (a bare `except:` in a loop) meets it again every 50 ms, and if it is still running
10 s after its limit the process ends with the same one line (exit 2).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from edgebundle.core.errors import RecipeError

DEFAULT_USER_CODE_S = 600.0
REPEAT_S = 0.05  # after the limit, the stop is raised again this often
GRACE_S = 10.0  # user code still running this long after its limit ignored every stop: the process ends


def _hard_stop(line: str) -> None:
    """User code that swallowed every stop: one line, exit 2, now (a bundle is only ever renamed into place
    whole, and a later run removes the temporary folders this one leaves)."""
    import os
    import sys

    sys.stderr.write(f"error: {line}; it ignored being stopped, so the run was ended\n")
    sys.stderr.flush()
    os._exit(2)


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

    line = (f"{what} did not return within {seconds:g} s (limits.user_code_s); it may hang, or raise the limit "
            "in the recipe")
    # once expired the timer fires again every REPEAT_S, so code that swallows the stop (`except BaseException`
    # in a loop) meets it again outside its handler; code that still runs GRACE_S later ends the process
    watchdog = threading.Timer(seconds + GRACE_S, _hard_stop, args=(line,))
    watchdog.daemon = True
    previous = signal.signal(signal.SIGALRM, expire)
    remaining, _ = signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT_S)
    watchdog.start()
    try:
        yield
    except _Expired as e:
        raise RecipeError(line) from e
    finally:
        watchdog.cancel()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:  # an outer limit was running: give it back what is left of it (approximately)
            signal.setitimer(signal.ITIMER_REAL, max(remaining - seconds, 0.001))
