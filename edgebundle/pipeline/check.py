"""`edgebundle check`: did the candidate bundle get slower (or less accurate) than the baseline?

When both bundles have their model files, they are timed **interleaved in one process**: rounds of A
then B (the order alternating every round), so drifts in machine speed hit both alike. Each round
gives one ratio of medians (candidate / baseline); the estimate is the median of the round ratios and
its 95 % CI comes from a bootstrap over rounds. A latency regression is declared when the estimate
exceeds 1 + tolerance **and** the CI's lower bound exceeds 1 (the slowdown is both larger than allowed
and real). When the baseline is only a manifest, the candidate is measured now and compared with the
baseline's recorded samples: a weaker comparison (different moments, no pairing), said in the result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import numpy as np

from edgebundle.core.errors import BundleError, IntegrityError
from edgebundle.pipeline.bundle import MANIFEST, Manifest, read_manifest, unsafe_entries, verify_files
from edgebundle.core.host import HostWatch, contention_text, fingerprint
from edgebundle.core.measure import interleaved_ratio, measure
from edgebundle.core.recipe import MeasureSpec

BOOTSTRAP = 4000


@dataclass(frozen=True)
class Side:
    path: Path
    manifest: Manifest
    has_model: bool


@dataclass
class CheckResult:
    regression: bool
    latency_regression: bool
    accuracy_regression: bool
    mode: str  # "interleaved" | "recorded"
    ratio: float
    ratio_ci95: tuple[float, float]
    tolerance: float
    candidate_p50_ms: float
    baseline_p50_ms: float
    rounds: int
    candidate_accuracy: float | None
    baseline_accuracy: float | None
    accuracy_tolerance: float
    target: str
    different_host: bool
    notes: list[str] = field(default_factory=list)
    accuracy_reference: str = "fp32 export"  # what both sides' accuracy is judged against (original, fp32 student)
    candidate_interval: list[float] | None = None  # each side's recorded verdict interval (manifest)
    baseline_interval: list[float] | None = None
    candidate_groups: int | None = None  # independent groups each side's verdict rests on (None: inputs)
    baseline_groups: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio_ci95"] = list(self.ratio_ci95)
        d["verdict"] = "regression" if self.regression else "ok"
        return d


def _side(p: Path) -> Side:
    p = Path(p)
    if not p.exists():
        raise BundleError(f"not found: {p}")
    m = read_manifest(p)
    folder = p if p.is_dir() else p.parent
    unsafe = unsafe_entries(folder, m)
    if unsafe:  # before anything is hashed or opened; a manifest alone is checked for this too
        raise IntegrityError(f"bundle {p} names files outside itself: {', '.join(unsafe)}; refused", unsafe)
    if p.is_dir():  # a whole bundle: it must be exactly what was written before it is timed
        bad = verify_files(p)
        if bad:
            raise IntegrityError(f"bundle {p} changed since it was written: {', '.join(bad)}", bad)
    has_model = (p.is_dir() or p.name == MANIFEST) and (folder / m.model_file).is_file()
    return Side(folder, m, has_model)


def _feeds(m: Manifest, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in m.inputs:
        shape = [batch if (i == 0 and isinstance(d, str)) else (d if isinstance(d, int) else 1)
                 for i, d in enumerate(t.shape)]
        dtype = np.dtype(t.dtype)
        feeds[t.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                         else np.zeros(shape, dtype=dtype))
    return feeds


def _open(side: Side):
    from edgebundle.targets import registry

    m = side.manifest
    entry = registry.lookup(m.target.name)
    target = entry.factory()
    rt = m.target.runtime
    return target.open(side.path / m.model_file, threads=int(rt.get("threads", 1)), runtime=rt)


def recorded_ratio(cand: np.ndarray, base: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Ratio of medians with a two-sample bootstrap CI (no pairing: a weaker comparison)."""
    rng = np.random.default_rng(0)
    a = np.median(cand[rng.integers(0, len(cand), size=(BOOTSTRAP, len(cand)))], axis=1)
    b = np.median(base[rng.integers(0, len(base), size=(BOOTSTRAP, len(base)))], axis=1)
    lo, hi = np.percentile(a / b, [2.5, 97.5])
    return float(np.median(cand) / np.median(base)), (float(lo), float(hi))


def is_latency_regression(ratio: float, ci95: tuple[float, float], tolerance: float) -> bool:
    """The gate's rule: the slowdown is larger than allowed and real (CI entirely above 1)."""
    return ratio > 1 + tolerance and ci95[0] > 1.0


def check(candidate: Path, baseline: Path, *, tolerance: float = 0.05, accuracy_tolerance: float = 0.5,
          allow_different_host: bool = False, rounds: int = 60, per_round: int = 20,
          device: str | None = None) -> CheckResult:
    cand, base = _side(candidate), _side(baseline)
    cm, bm = cand.manifest, base.manifest
    _comparable(cm, bm)
    if device is not None:
        return _on_device(cm, bm, device, tolerance, accuracy_tolerance, allow_different_host)
    notes: list[str] = []
    different = _different_hosts(cand, base, allow_different_host, notes)
    if cand.has_model and base.has_model:
        mode, n = "interleaved", rounds
        ratio, ci, a50, b50 = _interleaved(cand, base, rounds, per_round, notes)
    else:
        mode = "recorded"
        ratio, ci, a50, b50, n = _against_recorded(cand, base, notes)
    for side, m, remeasured in (("candidate", cm, cand.has_model), ("baseline", bm, base.has_model and cand.has_model)):
        state = (m.latency or {}).get("host_state")
        if not remeasured and state and state.get("contended"):
            notes.append(f"the {side}'s recorded latency was measured under contention ({contention_text(state)})")
    latency_reg = is_latency_regression(ratio, ci, tolerance)
    ca, ba, ref_c = _accuracies(cm, bm, notes)
    acc_reg = ca is not None and ba is not None and accuracy_worse_by(cm.accuracy.metric, ca, ba, cm.accuracy.details
                                                                      ) > accuracy_tolerance
    return CheckResult(
        regression=latency_reg or acc_reg, latency_regression=latency_reg, accuracy_regression=acc_reg,
        mode=mode, ratio=ratio, ratio_ci95=ci, tolerance=tolerance, candidate_p50_ms=a50, baseline_p50_ms=b50,
        rounds=n, candidate_accuracy=ca, baseline_accuracy=ba, accuracy_tolerance=accuracy_tolerance,
        target=cm.target.name, different_host=different, notes=notes, accuracy_reference=ref_c,
        candidate_interval=cm.accuracy.interval, baseline_interval=bm.accuracy.interval,
        candidate_groups=cm.accuracy.groups, baseline_groups=bm.accuracy.groups,
    )


def device_record(m: Manifest, side: str, device: str) -> dict[str, Any]:
    """The newest measurement of a bundle on `device` (BundleError when it has none)."""
    recs = [r for r in (m.devices or []) if r.get("device") == device]
    if not recs:
        have = sorted({r.get("device") for r in (m.devices or [])})
        raise BundleError(f"the {side} {m.target.name} bundle has no measurement on device {device} ("
                          + (f"it has: {', '.join(have)}" if have else "it has none")
                          + "); measure it there: edgebundle measure BUNDLE --device ...")
    return recs[-1]


def _on_device(cm: Manifest, bm: Manifest, device: str, tolerance: float, accuracy_tolerance: float,
               allow_different: bool) -> CheckResult:
    """check --device NAME: both bundles' newest records on that device, their recorded samples compared (they
    were taken at different moments: the weaker comparison, said so) and the candidate's verdict there."""
    c, b = device_record(cm, "candidate", device), device_record(bm, "baseline", device)
    c_acc, b_acc = c["accuracy"] or {}, b["accuracy"] or {}  # {}: not judged there (measured without --work)
    notes = [f"device {device}: recorded samples compared (candidate taken {c['taken']}, baseline {b['taken']}), "
             "not interleaved"]
    different = c["fingerprint"].get("id") != b["fingerprint"].get("id")
    if different:
        if not allow_different:
            raise BundleError(f"device {device} is not the same hardware in both records (candidate "
                              f"{c['fingerprint'].get('id')}, baseline {b['fingerprint'].get('id')}); pass "
                              "--allow-different-host to compare anyway")
        notes.append("the two records come from different hardware (--allow-different-host): unreliable")
    for side, r in (("candidate", c), ("baseline", b)):
        if not r["latency"].get("samples_ms"):
            raise BundleError(f"the {side}'s record on {device} has no per-iteration samples ({r['how']}): "
                              "nothing to compare with an interval")
        if r["figure"] != "device":
            notes.append(f"the {side}'s record on {device} is a figure of the {r['figure']}, not of a device")
    cs, bs = np.array(c["latency"]["samples_ms"]), np.array(b["latency"]["samples_ms"])
    ratio, ci = recorded_ratio(cs, bs)
    ca, ba = c_acc.get("value"), b_acc.get("value")
    acc_reg = bool(c_acc) and not c_acc["within_budget"]
    if ca is not None and ba is not None:
        acc_reg = acc_reg or accuracy_worse_by(cm.accuracy.metric, ca, ba, cm.accuracy.details) > accuracy_tolerance
    elif not c_acc:
        notes.append(f"the candidate's accuracy was not judged on {device} (measure it with --work)")
    latency_reg = is_latency_regression(ratio, ci, tolerance)
    return CheckResult(
        regression=latency_reg or acc_reg, latency_regression=latency_reg, accuracy_regression=acc_reg,
        mode=f"device {device}", ratio=ratio, ratio_ci95=ci, tolerance=tolerance,
        candidate_p50_ms=float(np.median(cs)), baseline_p50_ms=float(np.median(bs)), rounds=len(bs),
        candidate_accuracy=ca, baseline_accuracy=ba, accuracy_tolerance=accuracy_tolerance, target=cm.target.name,
        different_host=different, notes=notes, accuracy_reference=cm.accuracy.against or "fp32 export",
        candidate_interval=c_acc.get("interval"), baseline_interval=b_acc.get("interval"),
        candidate_groups=c_acc.get("groups"), baseline_groups=b_acc.get("groups"))


def _comparable(cm: Manifest, bm: Manifest) -> None:
    """Two bundles of one target, both complete with latency measured on their runtime (else a BundleError)."""
    if cm.target.name != bm.target.name:
        raise BundleError(f"candidate is a '{cm.target.name}' bundle, baseline a '{bm.target.name}' bundle: "
                          "compare bundles of the same target")
    for side, m in (("candidate", cm), ("baseline", bm)):
        if m.target.status == "rejected":
            why = m.target.rejection or "over its accuracy budget"
            raise BundleError(f"{side} {m.target.name} bundle is rejected ({why}): a rejected bundle is not compared")
        if m.target.status != "complete" or not m.target.exercised:
            raise BundleError(f"{side} {m.target.name} bundle is {m.target.status}: it has no latency measured on "
                              "its runtime to compare (finish it with `edgebundle build` on its machine)")


def _different_hosts(cand: Side, base: Side, allow: bool, notes: list[str]) -> bool:
    """Whether the two latencies come from different hosts (a side with its model here is re-measured here)."""
    hosts = {"candidate": cand.manifest.host.get("id"), "baseline": base.manifest.host.get("id")}
    here = fingerprint()["id"]
    if cand.has_model:
        hosts["candidate"] = here
    if base.has_model and cand.has_model:
        hosts["baseline"] = here
    different = len(set(hosts.values())) > 1
    if different and not allow:
        raise BundleError(f"latency figures come from different hosts (candidate {hosts['candidate']}, baseline "
                          f"{hosts['baseline']}); pass --allow-different-host to compare anyway")
    if different:
        notes.append("compared across different hosts (--allow-different-host): the latency verdict is unreliable")
    return different


def _interleaved(cand: Side, base: Side, rounds: int, per_round: int, notes: list[str]):
    """Both models timed here, interleaved: (ratio, its 95 % interval, candidate p50, baseline p50)."""
    cm, bm = cand.manifest, base.manifest
    batch = int((cm.latency or {}).get("batch", 1))
    fa, fb = _feeds(cm, batch), _feeds(bm, batch)
    with _open(cand) as sa, _open(base) as sb, HostWatch() as watch:
        ratio, ci, a50, b50 = interleaved_ratio(lambda: sa.run(fa), lambda: sb.run(fb),
                                                rounds=rounds, per_round=per_round)
    if watch.state.get("contended"):
        notes.append(f"both sides were timed here under contention ({contention_text(watch.state)}): "
                     "interleaving keeps the ratio fair, but its interval is wider")
    return ratio, ci, a50, b50


def _against_recorded(cand: Side, base: Side, notes: list[str]):
    """The baseline's recorded samples against the candidate timed here (or its recorded samples): (ratio,
    interval, candidate p50, baseline p50, samples)."""
    cm, bm = cand.manifest, base.manifest
    if not bm.latency or not bm.latency.get("samples_ms"):
        raise BundleError(f"baseline {base.path} has no recorded latency samples")
    base_s = np.array(bm.latency["samples_ms"])
    if cand.has_model:
        feeds = _feeds(cm, int(bm.latency.get("batch", 1)))
        spec = MeasureSpec(warmup_min=20, warmup_max=500, iterations=len(base_s))
        with _open(cand) as s:
            cand_s = np.array(measure(lambda: s.run(feeds), spec, threads=cm.target.runtime.get("threads", 1))
                              .samples_ms)
    else:
        if not cm.latency or not cm.latency.get("samples_ms"):
            raise BundleError(f"candidate {cand.path} has neither a model nor recorded latency samples")
        cand_s = np.array(cm.latency["samples_ms"])
    ratio, ci = recorded_ratio(cand_s, base_s)
    notes.append("baseline has no model here: compared with its recorded samples, taken at another time "
                 "without interleaving; a weaker comparison than an interleaved run")
    return ratio, ci, float(np.median(cand_s)), float(np.median(base_s)), len(base_s)


def _accuracies(cm: Manifest, bm: Manifest, notes: list[str]):
    """(candidate accuracy, baseline accuracy, the candidate's reference): both None when they are judged by
    different metrics or against different references (a note says which)."""
    ca, ba = cm.accuracy.target, bm.accuracy.target
    if cm.accuracy.metric != bm.accuracy.metric:
        notes.append(f"accuracy not compared: the candidate is judged by {cm.accuracy.metric}, the baseline by "
                     f"{bm.accuracy.metric}")
        ca = ba = None
    ref_c, ref_b = cm.accuracy.against or "fp32 export", bm.accuracy.against or "fp32 export"
    if ref_c != ref_b and ca is not None:
        notes.append(f"accuracy not compared: the candidate is judged against the {ref_c}, the baseline against "
                     f"the {ref_b} (metric.reference)")
        ca = ba = None
    return ca, ba, ref_c


def accuracy_worse_by(metric: str, candidate: float, baseline: float, details: dict | None = None) -> float:
    """How much worse the candidate is than the baseline, in points of the metric: percentage points for top1
    and agreement, hundredths for cosine (0.01 = 1 point), dB for snr, the function's units otherwise; for
    mse, the relative increase in percent."""
    if metric == "cosine":
        return (baseline - candidate) * 100.0
    if metric == "mse":
        return (candidate - baseline) / baseline * 100.0 if baseline > 0 else (100.0 if candidate > 0 else 0.0)
    higher = True
    if metric not in ("top1", "agreement", "snr"):
        higher = bool((details or {}).get("higher_is_better", True))
    return (baseline - candidate) if higher else (candidate - baseline)


def junit_xml(res: CheckResult) -> str:
    """A JUnit report with one test case for latency and one for accuracy."""
    suite = ET.Element("testsuite", name=f"edgebundle check ({res.target})", tests="2",
                       failures=str(int(res.latency_regression) + int(res.accuracy_regression)))

    def case(name: str, failed: bool, text: str) -> None:
        tc = ET.SubElement(suite, "testcase", classname=f"edgebundle.{res.target}", name=name)
        if failed:
            ET.SubElement(tc, "failure", message=f"{name} regression").text = text
        else:
            ET.SubElement(tc, "system-out").text = text

    case("latency", res.latency_regression,
         f"p50 ratio candidate/baseline {res.ratio:.3f} (95% CI {res.ratio_ci95[0]:.3f}-{res.ratio_ci95[1]:.3f}), "
         f"tolerance {res.tolerance:.1%}, {res.mode}")
    case("accuracy", res.accuracy_regression,
         f"candidate {res.candidate_accuracy} vs baseline {res.baseline_accuracy} (each against the "
         f"{res.accuracy_reference}), tolerance {res.accuracy_tolerance}")
    return ET.tostring(suite, encoding="unicode")


def to_json(res: CheckResult) -> str:
    return json.dumps(res.to_dict(), indent=1)
