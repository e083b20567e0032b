"""How trustworthy is `edgebundle check`? False-alarm rate, power, and measurement repeatability.

Two real ONNX models run by the ORT-CPU target's session class: A = a stem and 10 identical 3x3 conv
blocks (32 channels, 32x32), B = the same with 11 blocks, i.e. ~10 % more real compute. Each trial
opens fresh sessions and runs the gate's own interleaved protocol and decision rule
(`check.interleaved_ratio`, `check.is_latency_regression`) at the default 5 % tolerance:

- A vs A trials: how often the gate cries regression when nothing changed (goal <= 5 %);
- B vs A trials: how often it catches the 10 % slowdown (goal >= 95 %);
- repeatability: the same model measured again and again (fresh session, the standard `measure()`
  protocol): the spread of the medians (goal: within +-5 %).

    python -m bench.gate [--trials 40]      # writes bench/results/gate.{json,md}
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import write
from edgebundle.exporters.onnx import export
from edgebundle.core.measure import interleaved_ratio
from edgebundle.pipeline.check import is_latency_regression
from edgebundle.core.measure import measure
from edgebundle.core.recipe import ExportStage, InputSpec, MeasureSpec
from edgebundle.targets.ort_cpu import OrtSession

THREADS = 2
TOLERANCE = 0.05


class ConvStack(nn.Module):
    def __init__(self, blocks: int, ch: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU())
                                      for _ in range(blocks)])
        self.head = nn.Linear(ch, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def macs(blocks: int, ch: int = 32, hw: int = 32 * 32) -> int:
    return 3 * ch * 9 * hw + blocks * ch * ch * 9 * hw + ch * 10


def trial(a: Path, b: Path, feeds, rounds: int) -> tuple[float, tuple[float, float], bool]:
    sa, sb = OrtSession(a, threads=THREADS), OrtSession(b, threads=THREADS)
    try:
        ratio, ci, _, _ = interleaved_ratio(lambda: sa.run(feeds), lambda: sb.run(feeds), rounds=rounds, per_round=20)
    finally:
        sa.close()
        sb.close()
    return ratio, ci, is_latency_regression(ratio, ci, TOLERANCE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=60, help="interleaved rounds per trial (check's --rounds)")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = [InputSpec(name="image", shape=[1, 3, 32, 32])]
    feeds = {"image": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    with tempfile.TemporaryDirectory() as td:
        paths = {}
        for name, blocks in (("A", 10), ("B", 11)):
            paths[name] = Path(td) / f"{name}.onnx"
            export(ConvStack(blocks).eval(), spec, ["logits"], ExportStage(), paths[name])
        compute = macs(11) / macs(10)
        same, slow = [], []
        for i in range(args.trials):  # alternate the two kinds so drifts hit both
            same.append(trial(paths["A"], paths["A"], feeds, args.rounds))
            slow.append(trial(paths["B"], paths["A"], feeds, args.rounds))
            print(f"trial {i + 1}/{args.trials}: A/A {same[-1][0]:.3f} {'ALARM' if same[-1][2] else 'ok'}; "
                  f"B/A {slow[-1][0]:.3f} {'caught' if slow[-1][2] else 'missed'}", flush=True)
        p50s = []
        for _ in range(args.repeats):
            s = OrtSession(paths["A"], threads=THREADS)
            p50s.append(measure(lambda: s.run(feeds), MeasureSpec(), threads=THREADS).p50_ms)
            s.close()
    p50s_a = np.array(p50s)
    dev = p50s_a / np.median(p50s_a) - 1
    pairs = p50s_a[1:] / p50s_a[:-1] - 1  # "measured twice": consecutive repeats
    false_alarm = float(np.mean([t[2] for t in same]))
    power = float(np.mean([t[2] for t in slow]))
    r_same, r_slow = np.array([t[0] for t in same]), np.array([t[0] for t in slow])
    payload = {
        "tolerance": TOLERANCE, "trials": args.trials, "threads": THREADS, "compute_ratio_B_over_A": compute,
        "false_alarm_rate": false_alarm, "power_at_10pct": power,
        "ratio_A_vs_A": {"median": float(np.median(r_same)), "min": float(r_same.min()), "max": float(r_same.max())},
        "ratio_B_vs_A": {"median": float(np.median(r_slow)), "min": float(r_slow.min()), "max": float(r_slow.max())},
        "ci95_width_median": float(np.median([t[1][1] - t[1][0] for t in same + slow])),
        "repeatability": {"p50_ms": p50s, "max_abs_dev_from_median": float(np.abs(dev).max()),
                          "max_abs_consecutive_change": float(np.abs(pairs).max()),
                          "within_5pct": bool(np.abs(pairs).max() <= 0.05)},
        "rounds": args.rounds,
        "trials_detail": {"A_vs_A": [[t[0], *t[1]] for t in same], "B_vs_A": [[t[0], *t[1]] for t in slow]},
    }
    md = (f"`edgebundle check` at tolerance {TOLERANCE:.0%}, {args.trials} trials of each kind, {args.rounds} interleaved "
          f"rounds per trial, {THREADS} threads; B has {compute - 1:.1%} more MACs than A (real compute).\n\n"
          "| measure | goal | result |\n|---|---|---|\n"
          f"| false alarms (A vs A) | <= 5 % | {false_alarm:.1%} ({sum(t[2] for t in same)}/{args.trials}) |\n"
          f"| power (B vs A, +10 % compute) | >= 95 % | {power:.1%} ({sum(t[2] for t in slow)}/{args.trials}) |\n"
          f"| ratio estimate A vs A: median [min, max] | ~1.00 | {np.median(r_same):.3f} "
          f"[{r_same.min():.3f}, {r_same.max():.3f}] |\n"
          f"| ratio estimate B vs A: median [min, max] | ~{compute:.2f} | {np.median(r_slow):.3f} "
          f"[{r_slow.min():.3f}, {r_slow.max():.3f}] |\n"
          f"| repeatability: same model measured {args.repeats}x, largest change between consecutive runs | "
          f"<= 5 % | {np.abs(pairs).max():.1%} (largest deviation from the median {np.abs(dev).max():.1%}) |\n")
    write("gate", payload, md)


if __name__ == "__main__":
    main()
