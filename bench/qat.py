"""Does quantization-aware training lift int8 of a real CNN where post-training int8 misses? `python -m bench.qat`

EfficientNet-Lite1 (ImageNet weights) on real photo crops judged on *every* crop (min_confidence 0, near-ties
included: where post-training int8 misses a 2-point budget), split at random 40 / 20 / 40. Two targets build
with QAT: executorch with `qat: auto` (tried because post-training int8 misses on the validation crops) and
ort-cpu with `qat: on` (the QAT program exported as Q/DQ ONNX). Beside each, the same target's post-training
int8 (`qat: off`; for ort-cpu ORT's own static int8 without accuracy control, every layer int8 both ways, with
int8 weights as the QAT program has them), judged by the same contract on the same unseen test crops and timed
interleaved in this process (2 threads, batch 1). Writes bench/results/qat.{json,md}; every figure names its
host's ISA.

    python -m bench.qat [--n 400] [--epochs 2]

The test suite runs the ort-cpu half on the same crops (tests/test_real.py); this is the whole comparison.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import interleaved, write
from edgebundle.core.recipe import load_recipe

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "real" / "efficientnet_lite.yaml"
THREADS = 2


def recipe_for(n: int, epochs: int):
    """The example on n crops split at random, judged on every crop, with the two QAT targets."""
    recipe = load_recipe(EXAMPLE)
    qat = {"epochs": epochs, "val_samples": 64}
    targets = [
        {"name": "executorch", "max_accuracy_drop": 2.0, "measure": {"iterations": 10},
         "options": {"precision": "int8", "also_fp32": False, "qat": qat}},
        {"name": "ort-cpu", "max_accuracy_drop": 2.0, "measure": {"iterations": 10},
         "options": {"precision": "int8", "layer_errors": False, "qat": dict(qat, enabled="on")}}]
    data = recipe.data.model_copy(update={
        "kwargs": {"n": n}, "calibration_samples": 32, "group_by": "none",
        "splits": recipe.data.splits.model_copy(update={"train": 0.4, "val": 0.2, "test": 0.4})})
    return recipe.model_copy(update={
        "data": data, "metric": recipe.metric.model_copy(update={"min_confidence": 0.0}),
        "targets": [recipe.target("ort-cpu").model_validate(t) for t in targets]})


def post_training(spec):
    """The same target without QAT: for ort-cpu ORT's own static int8 of every layer (no accuracy control) with
    int8 weights, as QAT's program has them (7-bit where the deployment ISA lacks VNNI; weights auto would try
    uint8 weights there too, which ORT runs several times slower than fp32 on AVX2)."""
    opts = dict(spec.options, qat={"enabled": "off"})
    if spec.name == "ort-cpu":
        opts.update(accuracy_control=False, weights="int8")
    return spec.model_validate({**spec.model_dump(), "options": opts})


def main(argv: list[str] | None = None) -> None:
    from bench.real import _open_bundle
    from edgebundle.pipeline.runner import build_target, run
    from edgebundle.pipeline.evaluate import measure_feeds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    recipe = recipe_for(args.n, args.epochs)
    rows, opened = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run(recipe, output=Path(tmp) / "out", keep_rejected=True)
        qat_s = time.perf_counter() - t0
        feeds = measure_feeds(res.prepared.dataset.test, res.prepared.recipe, 1)
        for spec, b in zip(recipe.targets, res.bundles):
            t0 = time.perf_counter()
            plain = build_target(res.prepared, post_training(spec), Path(tmp) / f"ptq-{spec.name}", keep_rejected=True)
            ptq_s = time.perf_counter() - t0
            for form, bundle, secs in (("post-training int8", plain, ptq_s), ("QAT int8", b, None)):
                m = bundle.manifest
                acc, q = m["accuracy"], m["quantization"]
                rows.append({"target": spec.name, "form": form, "status": bundle.status,
                             "test_agreement": acc["target"], "judged": acc["judged_samples"],
                             "within_budget": acc["within_budget"], "val_tried": q.get("activations_tried_on_val"),
                             "qat": q.get("qat"), "build_s": None if secs is None else round(secs, 1)})
                opened[f"{spec.name} {form}"] = _open_bundle(bundle.path, m, THREADS)
        timing = interleaved({k: (lambda s=s: s.run(feeds)) for k, s in opened.items()}, threads=THREADS)
        for s in opened.values():
            s.close()
    for r in rows:
        r["timing"] = timing[f"{r['target']} {r['form']}"]
    write("qat", {"n": args.n, "epochs": args.epochs, "qat_run_s": round(qat_s, 1), "rows": rows},
          _markdown(rows, args.n))


def _markdown(rows: list[dict], n: int) -> str:
    out = [f"EfficientNet-Lite1 (ImageNet weights), {n} real photo crops split at random 40 / 20 / 40, judged on "
           "every crop (near-ties included) against the fp32 model on the test crops no step saw; budget 2 points. "
           "p50 timed interleaved in one process (2 threads, batch 1).", "",
           "| target | int8 form | test agreement | p50 ms (IQR) | status |", "|---|---|---|---|---|"]
    for r in rows:
        t = r["timing"]
        out.append(f"| {r['target']} | {r['form']} | {r['test_agreement']:.1f} % (n={r['judged']}) | "
                   f"{t['p50_ms']:.2f} ({t['iqr_ms'][0]:.2f}–{t['iqr_ms'][1]:.2f}) | {r['status']} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
