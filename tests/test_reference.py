"""One budget end to end: with prune or distill on, every bundle is judged against the original model (the
teacher as the recipe names it), the chain original -> student fp32 -> bundle is recorded, and a rejection
names the step that spent the budget. `metric.reference: student` keeps judging against the student."""

from __future__ import annotations

import dataclasses

import numpy as np

from edgebundle.core.metrics import MetricSpec
from edgebundle.pipeline.evaluate import original_reference
from edgebundle.pipeline.runner import build_target


def _with_metric(prepared, **metric):
    recipe = prepared.recipe.model_copy(update={"metric": MetricSpec(**metric)})
    return dataclasses.replace(prepared, recipe=recipe)


def _spec(prepared):
    spec = prepared.recipe.target("ort-cpu")
    return spec.model_copy(update={"measure": spec.measure.model_copy(update={"iterations": 20})})


def test_default_bundle_is_judged_against_the_original_teacher(default_run):
    m = next(b.manifest for b in default_run.bundles if b.target == "ort-cpu")
    acc = m["accuracy"]
    assert acc["reference"] == "original"
    assert [s["step"] for s in acc["chain"]] == ["original", "student fp32", "bundle"]
    assert acc["chain"][1]["by"] == ["prune", "distill"]
    # top-1 of the reference is the teacher's own test accuracy, not the student's
    assert abs(acc["fp32_onnx"] - acc["teacher_pytorch"]) < 1e-6
    assert acc["chain"][2]["vs_original"]["value"] == acc["target"]
    # every verdict carries its interval (here a paired bootstrap of top-1's drop) and says what decided
    lo, hi = acc["interval"]
    assert lo <= acc["target"] <= hi and acc["confidence"] == 0.95 and acc["decided_by"] == "point estimate"
    # the original's outputs are the teacher's, which differ from the pruned student's
    orig = original_reference(default_run.prepared)
    assert orig.shape == (len(default_run.prepared.dataset.test), 10)


def test_a_student_over_budget_against_the_original_is_rejected_naming_the_step(prepared, tmp_path):
    """The pruned, distilled digits student sits near cosine 0.8-0.9 against its teacher's logits: against
    the original a 0.95 / 0.98 cosine budget is missed, and the line says pruning + distillation spent it;
    the same build judged against the student (reference: student) holds, and says what the student costs."""
    strict = _with_metric(prepared, name="cosine", min_cosine=0.95, min_mean_cosine=0.98)
    res = build_target(strict, _spec(strict), tmp_path / "out")
    assert res.status == "rejected" and res.path is None and not (tmp_path / "out" / "ort-cpu").exists()
    assert "against the original model missed the budget" in res.reason
    assert "pruning + distillation: cosine mean" in res.reason and "vs original (over budget alone)" in res.reason
    assert "int8: cosine mean" in res.reason and "more" in res.reason

    lenient = _with_metric(prepared, name="cosine", min_cosine=0.95, min_mean_cosine=0.98, reference="student")
    res2 = build_target(lenient, _spec(lenient), tmp_path / "out2")
    assert res2.status == "complete", res2.reason
    acc = res2.manifest["accuracy"]
    assert acc["reference"] == "student" and acc["within_budget"]
    student = acc["chain"][1]["vs_original"]
    assert not student["within_budget"] and student["value"] < 0.95
    assert any("metric.reference: student" in n and "outside the budget against the original" in n
               for n in res2.manifest["notes"])


def test_report_and_check_name_the_reference(default_run, tmp_path):
    from edgebundle.pipeline.bundle import read_manifest
    from edgebundle.pipeline.report import render

    path = default_run.output / "ort-cpu"
    html = render([(path, read_manifest(path))])
    assert "vs original: student fp32 (prune + distill)" in html
    assert np.isfinite(default_run.bundles[0].manifest["accuracy"]["chain"][1]["vs_original"]["value"])
    from edgebundle.pipeline.check import check

    res = check(path, path, rounds=3, per_round=2)
    assert res.accuracy_reference == "original" and res.candidate_accuracy == res.baseline_accuracy


def test_accuracy_control_chooses_on_validation_and_the_verdict_is_on_the_test_split(default_run):
    """What a target chooses on (accuracy control, QAT epochs) is the validation split; the verdict that ships
    or rejects a bundle rests on the test split only, which no choice saw."""
    m = next(b.manifest for b in default_run.bundles if b.target == "ort-cpu")
    assert m["quantization"]["accuracy_budget"]["split"] == "val"
    ds = default_run.prepared.dataset
    assert m["accuracy"]["split"] == "test" and m["accuracy"]["samples"] == len(ds.test)
    assert m["accuracy"]["judged_samples"] == len(ds.test) != len(ds.val)
    val_ids = {x.tobytes() for x in ds.val.inputs["image"]}
    assert not any(x.tobytes() in val_ids for x in ds.test.inputs["image"])


def test_resolvability_is_checked_on_the_outputs_the_verdict_uses(prepared):
    """With metric.reference student the verdict counts the fp32 student's confident inputs, so the check that
    there are enough of them (before any build) is on the student's outputs, not the original's: a student
    confident on none used to pass it and crash (or read 100 % on zero inputs) at the verdict."""
    from types import SimpleNamespace

    import numpy as np

    from edgebundle.pipeline.build import verdict_reference

    student, original = np.zeros((4, 10)), np.ones((4, 10))
    metric = prepared.recipe.metric
    as_original = SimpleNamespace(recipe=SimpleNamespace(metric=metric.model_copy(update={"reference": "original"})))
    as_student = SimpleNamespace(recipe=SimpleNamespace(metric=metric.model_copy(update={"reference": "student"})))
    assert verdict_reference(as_original, student, original) is original
    assert verdict_reference(as_student, student, original) is student
    assert verdict_reference(as_original, student, None) is student  # nothing compressed: the export is the original
