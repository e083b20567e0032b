"""Shared helpers for the benchmarks: interleaved timing, output writing."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgebundle.core.host import fingerprint
from edgebundle.core.measure import summarize, time_block, warm_up
from edgebundle.core.recipe import MeasureSpec

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 7, per_round: int = 30, threads: int = 2
                ) -> dict[str, dict[str, Any]]:
    """Time every candidate in alternating rounds (A B C A B C ...), so machine noise hits all alike.

    Returns per candidate: median, IQR, the 95 % bootstrap CI of the median, and per-round medians.
    """
    spec = MeasureSpec(warmup_min=20, warmup_max=400)
    for fn in fns.values():
        warm_up(fn, spec)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    rounds_med: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            r = time_block(fn, per_round).tolist()
            samples[name] += r
            rounds_med[name].append(float(np.median(r)))
    out = {}
    for name, s in samples.items():
        st = summarize(np.array(s), batch=1, threads=threads)
        q1, q3 = np.percentile(s, [25, 75])
        out[name] = {"p50_ms": st.p50_ms, "p50_ci95_ms": list(st.p50_ci95_ms), "iqr_ms": [float(q1), float(q3)],
                     "p90_ms": st.p90_ms, "cv": st.cv, "round_medians_ms": rounds_med[name], "n": len(s)}
    return out


def int8_peak(threads: int = 2, repeats: int = 40) -> tuple[float, str]:
    """The int8 multiply-accumulate rate this host really reaches: ORT's MatMulInteger (u8 x s8 -> s32, the
    kernel int8 bundles run on) on GEMMs large enough to keep every SIMD unit busy, the best of `repeats`
    runs per shape (a peak is a maximum: noise only ever slows a run down). Returns (MACs/s, how)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    best, how = 0.0, ""
    for m, k, n in ((256, 1024, 1024), (512, 1024, 1024), (128, 2048, 2048)):
        w = numpy_helper.from_array(rng.integers(-128, 128, (k, n), dtype=np.int8), "B")
        graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "peak",
                                  [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])], [w])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                    .SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = {"A": rng.integers(0, 256, (m, k), dtype=np.uint8)}
        fn = lambda: sess.run(None, feed)  # noqa: E731
        warm_up(fn, MeasureSpec(warmup_min=5, warmup_max=50))
        rate = m * k * n / (float(np.min(time_block(fn, repeats))) / 1e3)
        if rate > best:
            best, how = rate, f"ORT MatMulInteger u8 x s8 {m}x{k}x{n}, {threads} threads, best of {repeats}"
    return best, how


def write(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """bench/results/NAME.json (payload + date + host) and NAME.md (host line + markdown); prints the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.date.today().isoformat(), "host": fingerprint()}
    j = RESULTS / f"{name}.json"
    j.write_text(json.dumps({**meta, **payload}, indent=1))
    host = meta["host"]
    header = (f"Host: {host['cpu']}, {host['usable_cores']} usable cores, ISA {', '.join(host['isa'])}; "
              f"onnxruntime {host['versions'].get('onnxruntime')}; {meta['date']}.\n\n")
    m = RESULTS / f"{name}.md"
    m.write_text(header + markdown)
    print(m.read_text())
    print(f"wrote {j} and {m}")
    return j, m
