import time

import numpy as np

from edgebundle.core.host import fingerprint
from edgebundle.core.measure import bootstrap_median_ci, measure, summarize
from edgebundle.core.recipe import MeasureSpec


def test_summary_statistics():
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), batch=4, threads=2)
    assert s.p50_ms == 3.0
    assert s.p50_ci95_ms[0] <= s.p50_ms <= s.p50_ci95_ms[1]
    assert s.p99_ms > s.p90_ms > s.p50_ms
    assert s.throughput_per_s == 4 * 1000 / 3.0
    assert abs(s.cv - s.std_ms / s.mean_ms) < 1e-12


def test_measure_times_real_work():
    spec = MeasureSpec(iterations=30, warmup_min=10, warmup_max=50)
    s = measure(lambda: time.sleep(0.002), spec, threads=1)
    assert 1.9 <= s.p50_ms <= 50
    assert s.iterations == 30 and s.warmup_iterations >= 10 and len(s.samples_ms) == 30


def test_time_budget_stops_early():
    spec = MeasureSpec(iterations=10_000, warmup_min=10, warmup_max=10, time_budget_s=0.05)
    s = measure(lambda: time.sleep(0.001), spec, threads=1)
    assert 10 <= s.iterations < 10_000


def test_bootstrap_ci_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    small = bootstrap_median_ci(rng.normal(10, 1, 20))
    large = bootstrap_median_ci(rng.normal(10, 1, 2000))
    assert (large[1] - large[0]) < (small[1] - small[0])


def test_fingerprint_fields():
    fp = fingerprint()
    assert fp["cpu"] and fp["usable_cores"] >= 1 and isinstance(fp["isa"], list)
    assert "onnxruntime" in fp["versions"] and "torch" in fp["versions"]
    assert len(fp["id"]) == 16 and fp["id"] == fingerprint()["id"]
