"""The accuracy contract: one metric per recipe, judged the same way for every target.

A bundle is judged against a reference's outputs on the same inputs: on the test split, the original
model's fp32 outputs (`metric.reference: original`, the default; where no prune, distill or cluster stage
ran the fp32 ONNX export is the original), or the fp32 student's (`reference: student`); inside a
target's accuracy control, the fp32 ONNX student's on the validation split. "fp32" below is that reference:

- `top1`: top-1 accuracy on labels; budget: at most `max_accuracy_drop` points below fp32.
- `agreement`: share of inputs whose top-1 class is the fp32 model's, judged only on the inputs where the
  fp32 model is confident (top-1 probability >= `min_confidence`): near-ties flip under any change of
  arithmetic (a bfloat16 cast of a whole ImageNet CNN flips 7 % of real photo crops, none of the confident
  ones). Budget: at most `max_accuracy_drop` points below 100. Reported beside it: agreement on all inputs
  and the share of all inputs whose fp32 top-1 stays in the bundle's top-5.
- `cosine`: per-sample cosine of the output against fp32; budget on the minimum and on the mean.
- `snr`: signal-to-noise ratio of the output against fp32 over the split, in dB; budget: a floor.
- `mse`: mean squared error against fp32; budget: a ceiling (`max_mse`, required).
- `module:fn`: a user function `fn(outputs, reference, labels) -> float` (numpy arrays; labels may be
  None), with its direction; budget: at most `max_accuracy_drop` (in the function's units) worse than the
  function's value on the fp32 outputs themselves.

The default (`auto`): labels -> top1; no labels and a classifier output (2-D, named like logits/probs/
scores/classes) -> agreement; otherwise cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgebundle.core.errors import RecipeError

BUILTIN = ("top1", "agreement", "cosine", "snr", "mse")
DROP_METRICS = ("top1", "agreement")  # judged in percentage points below the fp32 reference
CLASSIFIER_HINTS = ("logit", "prob", "score", "class")


class MetricSpec(BaseModel):
    """`metric:` in the recipe: what "keeps its accuracy" means for this model."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field("auto", description="auto | top1 | agreement | cosine | snr | mse | 'module:fn'")
    output: str | None = Field(None, description="the output judged (default: the first)")
    min_confidence: float = Field(0.5, ge=0, lt=1, description=(
        "agreement: judged on inputs whose fp32 top-1 probability is at least this"))
    min_cosine: float = Field(0.99, ge=-1, le=1, description="cosine: the per-sample minimum must reach this")
    min_mean_cosine: float = Field(0.995, ge=-1, le=1, description="cosine: the mean must reach this")
    min_snr_db: float = Field(20.0, description="snr: the floor in dB")
    max_mse: float | None = Field(None, gt=0, description="mse: the ceiling (required for mse)")
    higher_is_better: bool = Field(True, description="a user function's direction")
    confidence: float | None = Field(None, gt=0.5, lt=1, description=(
        "with it (e.g. 0.95) a bundle is within budget only when its interval's worst end is; without it the "
        "point estimate decides. The interval is always computed and shown"))
    reference: Literal["original", "student"] = Field("original", description=(
        "what a bundle is judged against when prune, distill or cluster ran: the original model's (the "
        "teacher's) fp32 outputs, end to end, or the pruned, distilled fp32 student's"))

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v == "auto" or v in BUILTIN:
            return v
        module, sep, attr = v.rpartition(":")
        if sep and module and attr:
            return v
        raise ValueError(f"unknown metric '{v}'; available: auto, {', '.join(BUILTIN)}, or 'module:function'")

    @model_validator(mode="after")
    def _mse_needs_ceiling(self) -> MetricSpec:
        if self.name == "mse" and self.max_mse is None:
            raise ValueError("metric 'mse' needs metric.max_mse (the largest mean squared error allowed)")
        return self

    @property
    def is_function(self) -> bool:
        return self.name not in BUILTIN and self.name != "auto"


def resolve_name(spec: MetricSpec, *, has_labels: bool, output_name: str, output_shape: tuple[int, ...]) -> str:
    """The metric `auto` stands for, given the data and the judged output."""
    if spec.name != "auto":
        return spec.name
    if has_labels:
        return "top1"
    classifier = len(output_shape) == 2 and output_shape[-1] >= 2 and any(
        h in output_name.lower() for h in CLASSIFIER_HINTS)
    return "agreement" if classifier else "cosine"


@dataclass(frozen=True)
class Verdict:
    metric: str
    value: float  # the bundle's score: points (top1, agreement), min cosine, dB, mse or the function's value
    reference: float | None  # the fp32 model's score on the same measure
    drop: float | None  # how much worse than the reference, in the metric's units (drop metrics, functions)
    within: bool
    budget: str  # the rule, in words
    samples: int  # inputs the verdict rests on
    loss: float  # one number, larger = worse, to rank attempts (drop, 1 - min cosine, -dB, mse)
    details: dict[str, Any] = field(default_factory=dict)
    max_drop: float | None = None  # the budget of drop metrics, in the metric's units
    interval: tuple[float, float] | None = None  # the value's confidence interval (cosine: of the mean)
    confidence: float | None = None  # the interval's level
    worst_within: bool | None = None  # whether the interval's worst end is within budget
    resolve_with: int | None = None  # judged inputs (groups, when grouped) that would make the interval narrower than the margin
    groups: int | None = None  # independent groups among the judged inputs, where the data gives groups
    point_within: bool | None = None  # the point estimate's own verdict (with an interval: `within` may be its worst end's)

    @property
    def judged_nothing(self) -> bool:
        """No input the metric judges (agreement: the fp32 model confident on none). Not within any budget, and
        no ground to steer on: a quantization choice drawn from such a slice is left to the test split."""
        return self.metric == "agreement" and self.samples == 0

    def line(self) -> str:
        """The verdict in a few words: 'agreement 97.50 % [95.1, 98.8] on 80 confident inputs (budget: ...)'."""
        of = f" from {self.groups} groups" if self.groups is not None else ""
        if self.metric == "agreement" and self.samples == 0:
            return (f"agreement: no input where the fp32 model is confident (top-1 probability >= "
                    f"{self.details.get('min_confidence')}), nothing judged (budget: {self.budget})")
        return (f"{self.metric} {_fmt(self.metric, self.value)}{self.interval_text()} on {self.samples} inputs{of} "
                f"(budget: {self.budget}){self.lost_text()}")

    def lost_text(self) -> str:
        """'; 10 of 14 output features lost (...)' where the whole-output metric hides them, else ''."""
        d = self.details

        def named(count: int, first: list[str]) -> str:
            return ", ".join(first) + (", ..." if count > len(first) else "")

        others = "".join(f"; output '{k}' (not judged by the metric): {o['features_lost']} of {o['features']} "
                         f"features lost against fp32 ({named(o['features_lost'], o['first'])})"
                         for k, o in (d.get("other_outputs_lost") or {}).items())
        if not d.get("features_lost"):
            return others
        return (f"; {d['features_lost']} of {d['features']} output features lost "
                f"({named(d['features_lost'], d['features_lost_first'])}: their error across inputs above "
                f"{LOST_ERROR:.0%} of their spread)") + others

    def resolve_text(self) -> str:
        """'about N judged inputs would resolve it' (groups, where the verdict rests on groups), or ''."""
        if not self.resolve_with:
            return ""
        return f"about {self.resolve_with} judged {'groups' if self.groups is not None else 'inputs'} would resolve it"

    def interval_text(self) -> str:
        if self.interval is None:
            return ""
        what = "mean " if self.metric == "cosine" else ""
        digits = 4 if self.metric == "cosine" else 2 if self.metric in DROP_METRICS else 3
        return f" [{what}{self.confidence:.0%} CI {self.interval[0]:.{digits}f}, {self.interval[1]:.{digits}f}]"


def _fmt(metric: str, v: float) -> str:
    if metric in DROP_METRICS:
        return f"{v:.2f} %"
    if metric == "cosine":
        return f"min {v:.4f}"
    if metric == "snr":
        return f"{v:.1f} dB"
    return f"{v:.6g}"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two whole arrays (flattened); 1.0 for two equal all-zero arrays."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


@dataclass(frozen=True)
class Comparison:
    """Two runs of the same outputs side by side: the one comparator export parity, bundle evaluation and
    the .ort round trip share."""

    max_abs: float
    cosine: float
    samples: int


def compare(a: np.ndarray, b: np.ndarray) -> Comparison:
    finite = np.isfinite(a).all() and np.isfinite(b).all()
    diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if finite else float("inf")
    return Comparison(diff, cosine(a, b) if finite else float("nan"), len(a))


def softmax_if_logits(x: np.ndarray) -> np.ndarray:
    """Rows as probabilities: kept when they already are (non-negative, summing to 1), else softmaxed."""
    x = x.astype(np.float64).reshape(len(x), -1)
    if (x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        return x
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def per_sample_cosine(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    a = out.astype(np.float64).reshape(len(out), -1)
    b = ref.astype(np.float64).reshape(len(ref), -1)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = np.all(a == b, axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), same)


def _top1(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).argmax(axis=1)


@dataclass(frozen=True)
class Contract:
    """The recipe's metric bound to one target's budget: `judge(reference, outputs, labels)`."""

    metric: str
    spec: MetricSpec
    max_drop: float  # points (top1, agreement) or the function's units
    output_index: int = 0
    output_name: str = "logits"
    fn: Callable[..., Any] | None = None
    timeout_s: float | None = None  # the time limit of each call of a user function

    @classmethod
    def plain(cls, metric: str) -> Contract:
        """The metric with its defaults and no budget: the scores training and distillation choose checkpoints
        and report by are computed by the same code that judges bundles."""
        return cls(metric, MetricSpec(name=metric), 0.0)

    @property
    def budget(self) -> str:
        s = self.spec
        if self.metric == "top1":
            return f"at most {self.max_drop:g} points below fp32"
        if self.metric == "agreement":
            return f"at most {self.max_drop:g} points below 100 % on inputs with fp32 confidence >= {s.min_confidence:g}"
        if self.metric == "cosine":
            return f"min cosine >= {s.min_cosine:g} and mean >= {s.min_mean_cosine:g}"
        if self.metric == "snr":
            return f"SNR >= {s.min_snr_db:g} dB"
        if self.metric == "mse":
            return f"MSE <= {s.max_mse:g}"
        return f"at most {self.max_drop:g} {'below' if s.higher_is_better else 'above'} the fp32 value"

    def needed_samples(self) -> int:
        """Judged inputs needed so that one changed input stays within a points budget (else the budget
        cannot be resolved: a single flip would decide it)."""
        if self.metric in DROP_METRICS:
            return max(1, math.ceil(100.0 / self.max_drop - 1e-9)) if self.max_drop > 0 else 1
        return 1

    def judge(self, reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None, *,
              interval: bool = False, groups: np.ndarray | None = None) -> Verdict:
        """The verdict on `outputs` against `reference`; with `interval`, its confidence interval too (at the
        recipe's `confidence`, 0.95 where it names none), and under `confidence` the interval decides.
        `groups` (one id per input): the interval resamples whole groups (cluster bootstrap), as inputs of one
        source (crops of one photo) are not independent."""
        v = self._judge(reference, outputs, labels)
        if interval:
            v = with_interval(v, self, reference, outputs, labels, groups)
        return with_lost_features(v, reference, outputs) if v.metric in CONTINUOUS else v

    def _judge(self, reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None) -> Verdict:
        m, s = self.metric, self.spec
        n = len(outputs)
        if m == "top1":
            if labels is None:
                raise ValueError("metric top1 needs labels")
            ref_acc = float((_top1(reference) == labels).mean() * 100.0)
            acc = float((_top1(outputs) == labels).mean() * 100.0)
            drop = ref_acc - acc
            agree = float((_top1(outputs) == _top1(reference)).mean() * 100.0)
            return Verdict(m, acc, ref_acc, drop, drop <= self.max_drop + 1e-9, self.budget, n, drop,
                           {"agreement_all": agree}, self.max_drop)
        if m == "agreement":
            p = softmax_if_logits(reference)
            confident = p.max(axis=1) >= s.min_confidence
            same = _top1(outputs) == _top1(reference)
            k = min(5, outputs.reshape(n, -1).shape[1])
            top5 = np.argpartition(-outputs.reshape(n, -1), k - 1, axis=1)[:, :k]
            kept5 = (top5 == _top1(reference)[:, None]).any(axis=1)
            judged = int(confident.sum())
            # no confident input: nothing judged, and nothing judged is not within any budget
            agree = float(same[confident].mean() * 100.0) if judged else 0.0
            drop = 100.0 - agree
            details = {"confident_inputs": judged, "all_inputs": n, "min_confidence": s.min_confidence,
                       "agreement_all": float(same.mean() * 100.0),
                       "fp32_top1_in_top5_all": float(kept5.mean() * 100.0)}
            return Verdict(m, agree, 100.0, drop, judged > 0 and drop <= self.max_drop + 1e-9, self.budget, judged,
                           drop, details, self.max_drop)
        if m == "cosine":
            c = per_sample_cosine(outputs, reference)
            finite = np.isfinite(c)
            cmin = float(c.min()) if finite.all() else float("nan")
            cmean = float(c.mean()) if finite.all() else float("nan")
            within = bool(finite.all() and cmin >= s.min_cosine and cmean >= s.min_mean_cosine)
            return Verdict(m, cmin, 1.0, None, within, self.budget, n,
                           (1.0 - cmin) if finite.all() else float("inf"),
                           {"cosine_min": cmin, "cosine_mean": cmean, "cosine_p01": float(np.percentile(c, 1))
                            if finite.all() else None})
        if m == "snr":
            r, o = reference.astype(np.float64), outputs.astype(np.float64)
            noise = float(((o - r) ** 2).sum())
            snr = float("inf") if noise == 0 else 10.0 * math.log10(float((r ** 2).sum()) / noise)
            return Verdict(m, snr, None, None, snr >= s.min_snr_db, self.budget, n, -snr)
        if m == "mse":
            mse = float(((outputs.astype(np.float64) - reference.astype(np.float64)) ** 2).mean())
            return Verdict(m, mse, 0.0, None, mse <= s.max_mse, self.budget, n, mse)
        # a user function
        if self.fn is None:
            raise ValueError(f"metric function {m} was not imported")
        value = _call(self.fn, m, outputs, reference, labels, self.timeout_s)
        ref_value = _call(self.fn, m, reference, reference, labels, self.timeout_s)
        drop = (ref_value - value) if s.higher_is_better else (value - ref_value)
        return Verdict(m, value, ref_value, drop, drop <= self.max_drop + 1e-12, self.budget, n, drop,
                       max_drop=self.max_drop)


BOOTSTRAP = 2000
FUNCTION_BOOTSTRAP = 100  # a user function is called twice per resample


def wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    from statistics import NormalDist

    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _bootstrap(stat: Callable[[np.ndarray], float], n: int, confidence: float, resamples: int = BOOTSTRAP,
               groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(indices) over `resamples` resamples of n inputs (seed 0); with
    `groups`, each resample draws whole groups with replacement (cluster bootstrap)."""
    rng = np.random.default_rng(0)
    if groups is None:
        draw = lambda: rng.integers(0, n, size=n)  # noqa: E731
    else:
        _, inverse = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]
        draw = lambda: np.concatenate([members[g] for g in rng.integers(0, len(members), size=len(members))])  # noqa: E731
    vals = np.array([stat(draw()) for _ in range(resamples)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return float("nan"), float("nan")
    a = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(vals, [a, 100 - a])
    return float(lo), float(hi)


CONTINUOUS = ("cosine", "snr", "mse")  # metrics over a whole output: a part of it can be lost under the rest
LOST_ERROR = 0.7  # a feature is lost when its error across inputs is above this share of its own spread


def lost_features(reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Indices of the output's features (flattened per input) that vary across inputs in the reference but whose
    error is above LOST_ERROR of that spread (RMS error / standard deviation; a constant at the mean scores 1.0):
    what a whole-output metric cannot see, e.g. class scores in 0-1 beside box coordinates in pixels, quantized
    with one scale and all rounded to 0, while cosine over the whole output stays 0.99998."""
    n = len(reference)
    if n < 2 or reference.shape != outputs.shape:
        return np.zeros(0, np.int64)
    r, o = reference.astype(np.float64).reshape(n, -1), outputs.astype(np.float64).reshape(n, -1)
    if not (np.isfinite(r).all() and np.isfinite(o).all()):
        return np.zeros(0, np.int64)
    spread = r.std(axis=0)
    varies = spread > 1e-6 * max(float(np.abs(r).max()), 1e-12)  # constants (and float noise on them): not judged
    err = np.sqrt(((o - r) ** 2).mean(axis=0))
    return np.flatnonzero(varies & (err > LOST_ERROR * spread))


def _lost_record(reference: np.ndarray, outputs: np.ndarray) -> dict[str, Any] | None:
    """`lost_features` as the manifest records it: how many of how many features, the first four named by
    their index within one input's output ('[4]', '[0, 2]'); None where none is lost."""
    lost = lost_features(reference, outputs)
    if not len(lost):
        return None
    shape = reference.shape[1:]
    return {"features_lost": int(len(lost)), "features": int(np.prod(shape)),
            "first": [str([int(i) for i in np.unravel_index(int(j), shape)]) for j in lost[:4]]}


def _over_budget(v: Verdict, details: dict[str, Any]) -> Verdict:
    """The verdict not within budget (its point and worst-end verdicts too, where it has them), with `details`."""
    import dataclasses

    return dataclasses.replace(v, within=False, point_within=False if v.point_within is not None else None,
                               worst_within=False if v.worst_within is not None else None,
                               details={**v.details, **details})


def with_lost_features(v: Verdict, reference: np.ndarray, outputs: np.ndarray) -> Verdict:
    """The verdict, not within budget where output features are lost (`lost_features`), whatever the whole-output
    metric says; the details name them."""
    lost = _lost_record(reference, outputs)
    if lost is None:
        return v
    return _over_budget(v, {"features_lost": lost["features_lost"], "features": lost["features"],
                            "features_lost_first": lost["first"]})


def other_outputs_lost(pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """For each output the metric does not judge, (fp32 reference, artifact's outputs) by name: the ones with
    features lost, each as `_lost_record` gives it."""
    records = {name: _lost_record(ref, out) for name, (ref, out) in pairs.items()}
    return {name: r for name, r in records.items() if r is not None}


def with_other_outputs(v: Verdict, lost: dict[str, dict[str, Any]]) -> Verdict:
    """The verdict, not within budget where outputs the metric does not judge lost features against fp32
    (`other_outputs_lost`): a bundle is judged on one output, but ships them all."""
    return _over_budget(v, {"other_outputs_lost": lost}) if lost else v


def with_interval(v: Verdict, c: Contract, reference: np.ndarray, outputs: np.ndarray,
                  labels: np.ndarray | None, groups: np.ndarray | None = None) -> Verdict:
    """The verdict with its interval: Wilson for agreement, a paired bootstrap over inputs for top-1's drop,
    cosine's mean, SNR, MSE and a user function's drop; with `groups` (not all distinct), every interval is a
    bootstrap over groups. Under `metric.confidence` the worst end decides."""
    import dataclasses

    conf = c.spec.confidence or 0.95
    n = len(outputs)
    if groups is not None and len(np.unique(groups)) == n:
        groups = None  # every input its own group: the plain intervals
    worst_drop = None  # drop metrics: the interval's worst drop
    judged_groups = None
    if v.metric == "agreement":
        iv, judged_groups = _agreement_interval(c, reference, outputs, groups, conf)
        worst_drop = 100.0 - iv[0]
    elif v.metric == "top1":
        d = ((_top1(reference) == labels).astype(np.float64) - (_top1(outputs) == labels)) * 100.0
        lo, hi = _bootstrap(lambda i: d[i].mean(), n, conf, groups=groups)  # the drop's interval
        iv = (v.reference - hi, v.reference - lo)
        worst_drop = hi
    elif v.metric == "cosine":
        cs = per_sample_cosine(outputs, reference)
        iv = (_bootstrap(lambda i: cs[i].mean(), n, conf, groups=groups) if np.isfinite(cs).all()
              else (float("nan"),) * 2)
    elif v.metric == "snr":
        r, o = reference.astype(np.float64).reshape(n, -1), outputs.astype(np.float64).reshape(n, -1)
        sig, noise = (r ** 2).sum(axis=1), ((o - r) ** 2).sum(axis=1)
        iv = _bootstrap(lambda i: 10.0 * math.log10(sig[i].sum() / noise[i].sum()) if noise[i].sum() > 0
                        else float("inf"), n, conf, groups=groups)
        # exact resamples are +inf; a percentile between two of them interpolates inf - inf = NaN: it is +inf
        iv = tuple(float("inf") if math.isnan(x) else x for x in iv)
    elif v.metric == "mse":
        e = ((outputs.astype(np.float64) - reference.astype(np.float64)) ** 2).reshape(n, -1).mean(axis=1)
        iv = _bootstrap(lambda i: e[i].mean(), n, conf, groups=groups)
    else:
        sign = 1.0 if c.spec.higher_is_better else -1.0
        lo, hi = _bootstrap(lambda i: sign * (_call(c.fn, v.metric, reference[i], reference[i], _take(labels, i),
                                                     c.timeout_s)
                                              - _call(c.fn, v.metric, outputs[i], reference[i], _take(labels, i),
                                                      c.timeout_s)), n, conf, FUNCTION_BOOTSTRAP, groups)
        iv = (v.reference - sign * hi, v.reference - sign * lo) if c.spec.higher_is_better else \
            (v.reference + hi, v.reference + lo)
        worst_drop = hi
    if groups is not None and judged_groups is None:
        judged_groups = len(np.unique(groups))
    iv = (float(min(iv)), float(max(iv)))
    if v.metric in DROP_METRICS:  # percentages: the bounds of a resampled difference can pass 0 or 100
        iv = (max(0.0, iv[0]), min(100.0, iv[1]))
    worst = _worst_within(v, c, iv, worst_drop)
    v = dataclasses.replace(v, groups=judged_groups)
    resolve = _resolve_with(v, c, iv, worst_drop) if not worst and v.within else None
    within = worst if c.spec.confidence is not None else v.within
    return dataclasses.replace(v, interval=iv, confidence=conf, worst_within=worst, resolve_with=resolve,
                               within=within, point_within=v.within)


def _agreement_interval(c: Contract, reference: np.ndarray, outputs: np.ndarray, groups: np.ndarray | None,
                        conf: float) -> tuple[tuple[float, float], int | None]:
    """Agreement's interval in percent over the confident inputs: Wilson's, or with groups a bootstrap over the
    groups among them; and how many groups those are (None without groups)."""
    confident = softmax_if_logits(reference).max(axis=1) >= c.spec.min_confidence
    same = (_top1(outputs) == _top1(reference))[confident]
    if groups is None:
        lo, hi = wilson(int(same.sum()), len(same), conf)
        return (lo * 100.0, hi * 100.0), None
    keep = np.flatnonzero(confident)
    lo, hi = _bootstrap(lambda i: same[i].mean() if len(i) else float("nan"), len(keep), conf, groups=groups[keep])
    return (lo * 100.0, hi * 100.0), len(np.unique(groups[keep]))


def _take(labels: np.ndarray | None, i: np.ndarray) -> np.ndarray | None:
    return None if labels is None else labels[i]


def _worst_within(v: Verdict, c: Contract, iv: tuple[float, float], worst_drop: float | None) -> bool:
    s = c.spec
    if v.metric == "agreement" and v.samples == 0:
        return False  # nothing judged
    if worst_drop is not None:
        return bool(worst_drop <= c.max_drop + 1e-9)
    if v.metric == "cosine":  # the minimum is already the worst judged input; the mean has an interval
        return bool(v.within and iv[0] >= s.min_mean_cosine)
    if v.metric == "snr":
        return bool(iv[0] >= s.min_snr_db)
    if v.metric == "mse":
        return bool(iv[1] <= s.max_mse)
    return v.within


def _resolve_with(v: Verdict, c: Contract, iv: tuple[float, float], worst_drop: float | None) -> int | None:
    """Judged inputs that would bring the interval's half-width within the point estimate's margin to the
    budget (half-widths shrink as 1/sqrt(n)); None when the point itself sits on the budget."""
    s = c.spec
    half = (iv[1] - iv[0]) / 2
    if worst_drop is not None and v.drop is not None:
        margin = c.max_drop - v.drop
    elif v.metric == "cosine":
        margin = v.details.get("cosine_mean", 0.0) - s.min_mean_cosine
    elif v.metric == "snr":
        margin = v.value - s.min_snr_db
    elif v.metric == "mse":
        margin = s.max_mse - v.value
    else:
        return None
    if not (math.isfinite(margin) and math.isfinite(half)) or margin <= 0 or half <= 0:
        return None
    return int(math.ceil((v.groups if v.groups is not None else v.samples) * (half / margin) ** 2))


class MetricFunctionError(RecipeError):
    """A user metric function raised, did not return in time, or returned something that is not a finite
    number: the recipe's error (exit 2) wherever it is judged, in a target's accuracy control too."""


def _call(fn: Callable[..., Any], name: str, outputs, reference, labels, timeout_s: float | None = None) -> float:
    from edgebundle.core.limits import time_limit

    try:
        with time_limit(timeout_s, f"metric function {name}"):
            v = fn(outputs, reference, labels)
    except RecipeError:  # the time limit
        raise
    except (Exception, SystemExit) as e:  # user code
        raise MetricFunctionError(f"metric function {name} failed: {type(e).__name__}: {e}") from e
    try:
        v = float(v)
    except (TypeError, ValueError) as e:
        raise MetricFunctionError(f"metric function {name} returned {type(v).__name__}, not a number") from e
    if not math.isfinite(v):
        raise MetricFunctionError(f"metric function {name} returned {v}")
    return v


def accuracy_text(metric: str, reference: float | None, value: float | None, judged: int | None = None,
                  details: dict[str, Any] | None = None, vs: str | None = None,
                  interval: list[float] | tuple[float, float] | None = None) -> str:
    """A bundle's accuracy in its metric's own units, reference -> bundle: 'agreement 100.00 -> 98.75 % (n=80)';
    `vs` names the reference where it is not the fp32 export itself ('... vs original')."""
    if value is None:
        return "n/a"
    if vs:
        return accuracy_text(metric, reference, value, judged, details, interval=interval) + f" vs {vs}"
    if interval:
        digits = 4 if metric == "cosine" else 2 if metric in DROP_METRICS else 3
        what = "mean " if metric == "cosine" else ""
        return (accuracy_text(metric, reference, value, judged, details)
                + f" [{what}CI {interval[0]:.{digits}f}–{interval[1]:.{digits}f}]")
    if metric in DROP_METRICS:
        head = f"{metric} {reference:.2f} → {value:.2f} %" if reference is not None else f"{metric} {value:.2f} %"
        return head + (f" (n={judged})" if judged is not None else "")
    if metric == "cosine":
        mean = (details or {}).get("cosine_mean")
        return f"cosine min {value:.4f}" + (f", mean {mean:.4f}" if mean is not None else "")
    if metric == "snr":
        return f"SNR {value:.1f} dB"
    return f"{metric} {value:.6g}" + (f" (fp32 {reference:.6g})" if reference is not None else "")
