"""The one latency-measurement protocol every target goes through.

Warm-up runs in windows until two consecutive window medians agree within 5 % (or a cap), then a fixed
number of timed iterations (or a time budget). Reported: median with a 95 % bootstrap confidence
interval, p90/p99, mean, std, coefficient of variation, throughput, and the raw samples.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from edgebundle.core import device_runner as protocol
from edgebundle.core.recipe import MeasureSpec

BOOTSTRAP_RESAMPLES = 2000
RATIO_BOOTSTRAP = 4000  # resamples for the CI of an interleaved ratio
MIN_BLOCK_MS = 20.0


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p50_ci95_ms: tuple[float, float]
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    cv: float
    throughput_per_s: float  # samples per second at this batch
    batch: int
    threads: int
    iterations: int
    warmup_iterations: int
    warmup_stable: bool
    samples_ms: tuple[float, ...]
    host_state: dict[str, Any] | None = None  # load, steal, frequency while timed; `contended` labels it

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["p50_ci95_ms"] = list(self.p50_ci95_ms)
        d["samples_ms"] = [round(x, 5) for x in self.samples_ms]
        return d


def bootstrap_median_ci(samples: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                        ) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(samples), size=(resamples, len(samples)))
    meds = np.median(samples[idx], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def time_block(fn: Callable[[], Any], n: int) -> np.ndarray:
    """Milliseconds of `n` back-to-back calls: the one timing loop (measure, check's rounds, the benches, and
    the device runner, whose loop it is)."""
    return np.array(protocol.time_block(fn, n))


def warm_up(fn: Callable[[], Any], spec: MeasureSpec) -> tuple[int, bool]:
    """Run until two consecutive windows' medians agree within 5 %; returns (iterations, stable)."""
    return protocol.warm_up(fn, spec.warmup_min, spec.warmup_max)


def summarize(samples_ms: np.ndarray, *, batch: int, threads: int, warmup: int = 0, stable: bool = True
              ) -> LatencyStats:
    s = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    mean, std = float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else 0.0
    return LatencyStats(
        p50_ms=float(p50), p50_ci95_ms=bootstrap_median_ci(s), p90_ms=float(p90), p99_ms=float(p99),
        mean_ms=mean, std_ms=std, cv=std / mean if mean > 0 else 0.0,
        throughput_per_s=batch * 1000.0 / float(p50) if p50 > 0 else 0.0,
        batch=batch, threads=threads, iterations=len(s), warmup_iterations=warmup, warmup_stable=stable,
        samples_ms=tuple(float(x) for x in s),
    )


def measure(fn: Callable[[], Any], spec: MeasureSpec, *, threads: int) -> LatencyStats:
    """Time `fn` (one inference at spec.batch) with warm-up; `threads` is recorded, set by the caller. The
    host's state while it ran is recorded with it (a contended figure says so)."""
    import dataclasses

    from edgebundle.core.host import HostWatch

    with HostWatch() as watch:
        warm, stable = warm_up(fn, spec)
        samples = protocol.timed(fn, spec.iterations, spec.time_budget_s)
    stats = summarize(np.array(samples), batch=spec.batch, threads=threads, warmup=warm, stable=stable)
    return dataclasses.replace(stats, host_state=watch.state)


def _block(fn, n: int) -> float:
    return float(np.median(time_block(fn, n)))


def _prepare_rounds(cand_fn, base_fn, per_round: int) -> int:
    """Warm both up; the inferences per block: at least MIN_BLOCK_MS of work (for sub-millisecond models a
    block of a few inferences is dominated by timer and scheduler noise, and the round ratios scatter)."""
    spec = MeasureSpec(warmup_min=20, warmup_max=500)
    warm_up(cand_fn, spec)
    warm_up(base_fn, spec)
    fastest = min(_block(cand_fn, 10), _block(base_fn, 10))
    return max(per_round, int(np.ceil(MIN_BLOCK_MS / max(fastest, 1e-6))))


def _rounds(cand_fn, base_fn, rounds: int, per_round: int, first: int = 0) -> list[tuple[float, float]]:
    """(candidate, baseline) block medians of ABBA-ordered rounds (the order alternates every round)."""
    out = []
    for r in range(first, first + rounds):
        if r % 2 == 0:
            a = _block(cand_fn, per_round)
            b = _block(base_fn, per_round)
        else:
            b = _block(base_fn, per_round)
            a = _block(cand_fn, per_round)
        out.append((a, b))
    return out


def _summary(pairs: list[tuple[float, float]]) -> tuple[float, tuple[float, float], float, float]:
    x = np.array([a / b for a, b in pairs])
    return (float(np.median(x)), bootstrap_median_ci(x, resamples=RATIO_BOOTSTRAP),
            float(np.median([a for a, _ in pairs])), float(np.median([b for _, b in pairs])))


def interleaved_ratio(cand_fn, base_fn, *, rounds: int, per_round: int) -> tuple[float, tuple[float, float], float, float]:
    """(median round ratio, its 95 % CI, candidate p50, baseline p50) from ABBA-ordered rounds."""
    per_round = _prepare_rounds(cand_fn, base_fn, per_round)
    return _summary(_rounds(cand_fn, base_fn, rounds, per_round))


@dataclass(frozen=True)
class Decision:
    """A sequential interleaved comparison: candidate/baseline ratio, its CI, and what it decided."""

    ratio: float
    ci95: tuple[float, float]
    rounds: int
    seconds: float
    outcome: str  # "faster" | "slower" | "within band" | "undecided"
    host_state: dict[str, Any]


def sequential_ratio(cand_fn, base_fn, *, band: float = 0.05, step: int = 12, per_round: int = 5,
                     max_seconds: float = 60.0, max_rounds: int = 600) -> Decision:
    """Keep timing interleaved rounds, `step` at a time, until the ratio's 95 % CI excludes 1 +- band
    (candidate faster or slower) or lies inside it (within the band), or the time budget ends (undecided).
    Noise widens the interval, so load makes the test measure longer rather than decide differently."""
    from edgebundle.core.host import HostWatch

    start = time.perf_counter()
    with HostWatch() as watch:
        per_round = _prepare_rounds(cand_fn, base_fn, per_round)
        pairs: list[tuple[float, float]] = []
        while True:
            pairs += _rounds(cand_fn, base_fn, step, per_round, first=len(pairs))
            ratio, ci, _, _ = _summary(pairs)
            if ci[1] < 1 - band:
                outcome = "faster"
            elif ci[0] > 1 + band:
                outcome = "slower"
            elif ci[0] >= 1 - band and ci[1] <= 1 + band:
                outcome = "within band"
            elif time.perf_counter() - start > max_seconds or len(pairs) >= max_rounds:
                outcome = "undecided"
            else:
                continue
            break
    return Decision(ratio, ci, len(pairs), time.perf_counter() - start, outcome, watch.state)
