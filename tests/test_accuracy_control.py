"""ORT accuracy control: per-layer error table, fewest layers kept in float when int8 is over budget."""

import onnx
import pytest
from typer.testing import CliRunner

from edgebundle.cli import app
from edgebundle.core.recipe import CalibrationSpec
from edgebundle.targets import registry
from edgebundle.targets import BuildContext

runner = CliRunner()


def _build(prepared, tmp_path, *, budget, calibration=None, target="ort-cpu", **options):
    r = prepared.recipe
    spec = r.targets[0].model_copy(update={"name": target, "max_accuracy_drop": budget,
                                           "calibration": calibration or r.targets[0].calibration})
    entry = registry.lookup(target)
    ctx = BuildContext(r, spec, entry.options_model.model_validate(options),
                       prepared.onnx.path("model.fp32.onnx"), prepared.dataset.calibration(r.data).head(16),
                       prepared.dataset.val, tmp_path, threads=2)
    return entry.factory().build(ctx)


def test_every_weighted_layer_has_an_error_row(default_run):
    q = default_run.bundles[0].manifest["quantization"]
    rows = q["layer_errors"]
    g = onnx.load(str(default_run.prepared.onnx.path("model.fp32.onnx"))).graph
    assert len(rows) == sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in g.node)
    sens = [r["sensitivity_db"] for r in rows]
    assert sens == sorted(sens) and all(s > 0 for s in sens)  # most damaged first, SQNR in dB
    assert q["accuracy_budget"]["drop_full_int8"] <= q["accuracy_budget"]["max_drop"]


@pytest.fixture(scope="module")
def harsh(prepared, tmp_path_factory):
    """Calibration that clips (95th percentile) and a 1-point budget: int8 goes over it. One weight form (int8,
    7-bit where the host lacks VNNI): weights auto would try uint8 too on such a host."""
    cal = CalibrationSpec(method="percentile", percentile=95.0)
    return _build(prepared, tmp_path_factory.mktemp("harsh"), budget=1.0, calibration=cal, weights="int8"), \
        _build(prepared, tmp_path_factory.mktemp("plain"), budget=1.0, calibration=cal, accuracy_control=False,
               weights="int8")


def test_over_budget_keeps_the_fewest_sensitive_layers_in_float(harsh):
    built, plain = harsh
    b = built.quantization["accuracy_budget"]
    assert plain.quantization["accuracy_budget"]["drop_full_int8"] > 1.0  # the harsh setting really hurts
    assert "excluded_nodes" in plain.quantization["accuracy_budget"] and not plain.quantization["accuracy_budget"]["excluded_nodes"]
    assert b["attempts"] and b["within_budget"] and b["drop_reached"] <= 1.0 < b["drop_full_int8"]
    n = len(b["excluded_nodes"])
    assert 1 <= n < len(built.quantization["layer_errors"])  # not everything fell back
    ranked = [r["node"] for r in built.quantization["layer_errors"]]
    assert b["excluded_nodes"] == ranked[:n]  # the most sensitive ones, in order
    assert b["latency_cost"]["p50_full_int8_ms"] > 0
    assert [a["excluded"] for a in b["attempts"]][0] == 1
    # every attempt timed: the int8 Pareto of what was tried (nothing float, then each attempt)
    pts = built.quantization["forms_tried"]["points"]
    assert [p["layers_kept_float"] for p in pts] == [0] + [a["excluded"] for a in b["attempts"]]
    assert all(p["p50_ms"] > 0 for p in pts) and pts[-1]["within_budget"] and not pts[0]["within_budget"]
    front = [p for p in pts if p["pareto"]]
    assert pts[-1] in front or any(p["within_budget"] for p in front)  # the closest point is never dominated
    assert min(pts, key=lambda p: p["p50_ms"]) in front  # nor the fastest


def test_pareto_marks_points_no_other_beats_on_both_axes():
    from edgebundle.calibration.accuracy import pareto

    pts = pareto([{"p50_ms": 1.0, "val_loss": 5.0}, {"p50_ms": 2.0, "val_loss": 1.0},
                  {"p50_ms": 2.5, "val_loss": 3.0}, {"p50_ms": 3.0, "val_loss": 1.0}, {"p50_ms": None, "val_loss": 0.0}])
    assert [p["pareto"] for p in pts] == [True, True, False, False, False]


def test_explain_shows_the_table(default_run):
    r = runner.invoke(app, ["explain", str(default_run.bundles[0].path)])
    assert r.exit_code == 0, r.output
    rows = default_run.bundles[0].manifest["quantization"]["layer_errors"]
    assert "SQNR" in r.output and rows[0]["node"] in r.output
    # each layer named by the student's own module (from the exporter's metadata), as a user knows it
    modules = dict(default_run.prepared.load_student().named_modules())
    assert all(row["module"] in modules for row in rows) and rows[0]["module"] in r.output
    assert {row["module"] for row in rows} >= {"features.0", "classifier"}
    r = runner.invoke(app, ["explain", str(default_run.bundles[1].path)])  # openvino: no ORT table
    assert r.exit_code == 2 and "no per-layer error table" in r.output


def test_tensorrt_qdq_model_gets_accuracy_control_and_keeps_the_placement_rules(prepared, tmp_path):
    """The TensorRT Q/DQ model (symmetric int8) under harsher calibration (91st percentile; at the 95th
    it lost only 0.56 points): over budget, the most sensitive layers stay float, the drop (measured through ONNX Runtime CPU) comes back within budget, and
    every layer still quantized follows TensorRT's placement rules."""
    from edgebundle.targets.tensorrt import qdq_problems

    cal = CalibrationSpec(method="percentile", percentile=91.0)
    built = _build(prepared, tmp_path, budget=1.0, calibration=cal, target="tensorrt")
    q = built.quantization
    b = q["accuracy_budget"]
    assert b["drop_full_int8"] > 1.0 and b["within_budget"] and b["drop_reached"] <= 1.0
    assert 1 <= len(b["excluded_nodes"]) < len(q["layer_errors"])
    assert b["excluded_nodes"] == [r["node"] for r in q["layer_errors"]][:len(b["excluded_nodes"])]
    model = onnx.load(str(tmp_path / built.model_file))
    assert qdq_problems(model, set(b["excluded_nodes"])) == []
    flagged = qdq_problems(model)  # without the exemption, exactly the float layers are reported
    assert sorted(p.split(":")[0] for p in flagged) == sorted(b["excluded_nodes"])
    assert "not measured" in b["latency_cost"]


def test_validation_inputs_that_judge_nothing_steer_nothing(prepared, tmp_path):
    """agreement on validation inputs where the fp32 model is never confident judges nothing, which is not within
    any budget: accuracy control chased it once and kept every layer float (EfficientNet-Lite1's photo split for
    AVX2: all 65 layers, 1.8x slower, shipped as int8). Now nothing steers on such a slice: no layer float, no
    second form, and the record says why; the test split decides."""
    import numpy as np

    from edgebundle.core.data import run_outputs
    from edgebundle.core.session import OrtSession

    r = prepared.recipe
    with OrtSession(prepared.onnx.path("model.fp32.onnx"), threads=2) as s:
        logits = run_outputs(s, prepared.dataset.val, r.inputs)[0]
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    top = float((p / p.sum(1, keepdims=True)).max(1).max())
    assert top < 1.0  # room for a threshold no validation input reaches
    from edgebundle.core.metrics import Contract, MetricSpec

    contract = Contract("agreement", MetricSpec(name="agreement", min_confidence=(top + 1.0) / 2), 1.0)
    spec = r.targets[0].model_copy(update={"name": "ort-cpu", "max_accuracy_drop": 1.0,
                                           "calibration": CalibrationSpec(method="percentile", percentile=95.0)})
    entry = registry.lookup("ort-cpu")
    ctx = BuildContext(r, spec, entry.options_model.model_validate({}), prepared.onnx.path("model.fp32.onnx"),
                       prepared.dataset.calibration(r.data).head(16), prepared.dataset.val, tmp_path, threads=2,
                       contract=contract)
    built = entry.factory().build(ctx)
    b = built.quantization["accuracy_budget"]
    assert b["judged_samples"] == 0 and not b["attempts"] and not b["excluded_nodes"]
    assert "judge nothing" in b["not_steered"] and "the test split decides" in b["not_steered"]
    assert "qat" not in built.quantization  # QAT is not started for a loss nobody saw: post-training int8 stands


HEAD = '''
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class Det(nn.Module):
    """A detector-style output: box coordinates in pixels beside class scores in 0..1, in one tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.classifier, self.box = nn.Linear(16, 10), nn.Linear(16, 4)

    def forward(self, image):
        f = self.features(image)
        return torch.cat([self.box(f) * 300 + 300.0, torch.softmax(self.classifier(f) * 300, 1)], 1)


def build():
    return Det()


def batches():
    x = ((load_digits().images / 16 - .5) / .5).astype(np.float32)[:, None]
    for i in range(0, len(x), 100):
        yield {"image": x[i:i + 100]}
'''


def test_a_part_of_an_output_lost_under_the_rest_is_over_budget_and_kept_float(tmp_path):
    """Box coordinates (about 300) and class scores (0..1) in one output: quantized with one scale, every score
    rounds to 0 while cosine over the whole output stays 0.9999x. The verdict names the lost features, and
    accuracy control keeps the output's node float first: the bundle ships int8 with its scores."""
    import importlib.util
    import json

    import numpy as np
    import onnxruntime as ort
    import torch
    import yaml

    from edgebundle.core.metrics import Contract, MetricSpec, lost_features

    rng = np.random.default_rng(0)
    box, scores = rng.uniform(250, 600, (50, 4)), rng.dirichlet(np.ones(10), 50)
    ref = np.concatenate([box, scores], 1)
    lost = np.concatenate([box + rng.normal(0, 1, box.shape), np.zeros_like(scores)], 1)
    v = Contract("cosine", MetricSpec(name="cosine", min_cosine=0.99), 0.0).judge(ref, lost, None, interval=True)
    assert v.details["cosine_min"] > 0.9999 and not v.within and list(lost_features(ref, lost)) == list(range(4, 14))
    assert "10 of 14 output features lost ([4], [5], [6], [7], ..." in v.line()
    assert lost_features(ref, ref + rng.normal(0, 0.01, ref.shape)).size == 0  # int8-sized noise: nothing lost

    (tmp_path / "det.py").write_text(HEAD)
    recipe = {"version": 1, "name": "det", "model": {"factory": "./det.py:build"},
              "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "dynamic_axes": {0: "batch"}}],
              "outputs": ["det"], "data": {"kind": "function", "function": "./det.py:batches"},
              "stages": {"train": {"enabled": False}, "prune": {"enabled": False}, "distill": {"enabled": False}},
              "targets": [{"name": "ort-cpu", "options": {"precision": "int8"}, "measure": {"iterations": 20}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "out" / "ort-cpu" / "manifest.json").read_text())
    assert m["target"]["precision"] == "int8" and m["quantization"]["accuracy_budget"]["excluded_nodes"], m["target"]
    spec = importlib.util.spec_from_file_location("det", tmp_path / "det.py")
    det = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(det)
    x = next(det.batches())["image"]
    with torch.no_grad():
        want = det.build().eval()(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(tmp_path / "out" / "ort-cpu" / m["model_file"])).run(None, {"image": x})[0]
    assert lost_features(want, got).size == 0 and (got[:, 4:].argmax(1) == want[:, 4:].argmax(1)).mean() > 0.9


TWO_OUTPUTS = HEAD.replace('''        return torch.cat([self.box(f) * 300 + 300.0, torch.softmax(self.classifier(f) * 300, 1)], 1)''',
                           '''        return self.classifier(f), torch.cat([self.box(f) * 300 + 300.0,
                                              torch.softmax(self.classifier(f) * 300, 1)], 1)''')


@pytest.mark.parametrize("isa", ["host", "avx2"])
def test_an_output_the_metric_does_not_judge_that_int8_loses_is_over_budget(tmp_path, isa):
    """Two outputs: the metric judges the logits (within budget in int8), the other output carries boxes beside
    class scores that int8's one scale rounds to 0. Nothing steers on it, but the bundle ships it: the verdict
    checks every output for lost features against fp32, so the build is rejected, the line naming the output
    (exit 1, no bundle where a good one is expected). Built for avx2, the same (every output is judged again
    where the deployment ISA's arithmetic is reproduced, emulated or capped, not only the one the metric reads;
    ORT's 7-bit int8 is the same integers on every ISA, so it is judged natively)."""
    import yaml

    (tmp_path / "det.py").write_text(TWO_OUTPUTS)
    recipe = {"version": 1, "name": "det2", "model": {"factory": "./det.py:build"},
              "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "dynamic_axes": {0: "batch"}}],
              "outputs": ["logits", "det"], "metric": {"name": "cosine", "min_cosine": 0.98},
              "data": {"kind": "function", "function": "./det.py:batches"},
              "stages": {"train": {"enabled": False}, "prune": {"enabled": False}, "distill": {"enabled": False}},
              "targets": [{"name": "ort-cpu", "options": {"precision": "int8", "isa": isa},
                           "measure": {"iterations": 20}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    line = " ".join(res.output.split())
    assert "rejected: ort-cpu: cosine min 0.99" in line and "output 'det' (not judged by the metric): " in line, line
    lost = line.split("features lost against fp32 (")[1].split(")")[0]
    assert all(int(f.strip("[]")) >= 4 for f in lost.replace(", ...", "").split(", ")), lost  # scores, not boxes
    assert not (tmp_path / "out" / "ort-cpu").exists()
