"""OpenVINO target: real OpenVINO + NNCF on the embedded default's student."""

import numpy as np
import pytest

from edgebundle.core.errors import TargetUnavailable
from edgebundle.exporters.onnx import cosine
from edgebundle.core.recipe import TargetSpec
from edgebundle.pipeline.runner import build_target, run_split
from edgebundle.stages.training import accuracy
from edgebundle.targets import registry

pytestmark = pytest.mark.openvino


@pytest.fixture(scope="module")
def ov_bundle(default_run):
    """The embedded default builds both ort-cpu and openvino."""
    return next(b for b in default_run.bundles if b.target == "openvino")


def test_bundle_has_ir_and_manifest(ov_bundle):
    names = sorted(p.name for p in ov_bundle.path.iterdir())
    assert names == ["SHA256SUMS", "manifest.json", "model.bin", "model.xml"]
    m = ov_bundle.manifest
    assert m["model_file"] == "model.xml" and m["target"]["precision"] == "int8"
    assert m["quantization"]["tool"] == "nncf.quantize"
    assert m["target"]["runtime"]["performance_hint"] == "latency"
    assert m["latency"]["p50_ms"] > 0 and m["reference_latency"]["openvino_fp32_student"]["p50_ms"] > 0


def test_the_manifest_says_how_to_compile_the_ir_as_it_was_judged(ov_bundle):
    """The f32 hint the bundle was judged with lives in the manifest, not in model.xml (OpenVINO does not apply a
    precision hint from the model's rt_info): a plain compile_model runs bf16 on CPUs with AMX or avx512_bf16."""
    m = ov_bundle.manifest
    hint = m["target"]["runtime"]["inference_precision_hint"]
    assert hint == "f32" and any(f"{{'INFERENCE_PRECISION_HINT': '{hint}'}}" in n for n in m["notes"]), m["notes"]


def test_int8_within_one_point_of_fp32(ov_bundle):
    acc = ov_bundle.manifest["accuracy"]
    assert acc["drop_vs_fp32"] <= 1.0
    assert acc["output_cosine_vs_fp32"] > 0.99


def test_ir_is_really_int8(ov_bundle):
    import openvino as ov

    model = ov.Core().read_model(str(ov_bundle.path / "model.xml"))
    types = {op.get_type_name() for op in model.get_ordered_ops()}
    assert "FakeQuantize" in types or any(
        op.get_output_element_type(0).get_type_name() in ("i8", "u8") for op in model.get_ordered_ops())


def test_ir_reloads_with_same_outputs(ov_bundle, default_run):
    target = registry.lookup("openvino").factory()
    ds, specs = default_run.prepared.dataset, default_run.prepared.recipe.inputs
    rt = ov_bundle.manifest["target"]["runtime"]
    a = run_split(target.open(ov_bundle.path / "model.xml", threads=2, runtime=rt), ds.test, specs)
    b = run_split(target.open(ov_bundle.path / "model.xml", threads=1, runtime=rt), ds.test, specs)
    assert cosine(a, b) > 0.9999
    assert accuracy(a, ds.test.labels) == ov_bundle.manifest["accuracy"]["target"]


def test_unknown_device_lists_available(default_run, tmp_path):
    import openvino as ov

    spec = TargetSpec(name="openvino", options={"device": "NPU"})
    if "NPU" in ov.Core().available_devices:
        pytest.fail("this host has an NPU; pick a device name it lacks")
    with pytest.raises(TargetUnavailable, match=r"device 'NPU' is not available; available devices: CPU"):
        build_target(default_run.prepared, spec, tmp_path)
    assert not (tmp_path / "openvino").exists()


def test_accuracy_control_records_drop_and_fp_layers(default_run, tmp_path):
    spec = TargetSpec(name="openvino", max_accuracy_drop=0.5, measure={"iterations": 20},
                      options={"accuracy_control": True, "subset_size": 64, "precision": "int8"})
    b = build_target(default_run.prepared, spec, tmp_path)
    q = b.manifest["quantization"]
    assert q["tool"] == "nncf.quantize_with_accuracy_control"
    assert [a["step"] for a in q["accuracy_budget"]["attempts"]] == ["accuracy_control"]
    assert q["accuracy_budget"]["attempts"][0]["val_drop"] <= 0.5
    assert isinstance(q["layers_in_higher_precision"], list)


def test_budget_escalation_is_recorded(ov_bundle):
    """Each attempt is recorded; the kept one fits the budget; earlier ones did not."""
    budget = ov_bundle.manifest["quantization"]["accuracy_budget"]
    attempts = budget["attempts"]
    assert attempts[0]["step"] == "defaults"
    assert attempts[-1]["val_drop"] <= budget["max_drop"]
    assert all(a["val_drop"] > budget["max_drop"] for a in attempts[:-1])
    if len(attempts) > 1:
        assert any("first settings dropped" in n for n in ov_bundle.manifest["notes"])


def _activation_ranges(xml):
    """(input_high - input_low) of every FakeQuantize on an activation (not on a Constant weight)."""
    import openvino as ov

    out = {}
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() == "Constant":
            continue
        lo, hi = (op.input_value(i).get_node().get_data() for i in (1, 2))
        out[op.get_friendly_name()] = float(np.max(hi - lo))
    return out


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_calibration_method_reaches_nncf(default_run, ov_bundle, tmp_path, method):
    """The recipe's calibration method changes NNCF's activation ranges: percentile (NNCF's QUANTILE
    statistic) clips below NNCF's min/max ranges; entropy (NNCF's HISTOGRAM search) picks other ranges."""
    spec = TargetSpec(name="openvino", measure={"iterations": 20}, options={"fallback": False, "precision": "int8"},
                      calibration={"method": method, "percentile": 99.0})
    b = build_target(default_run.prepared, spec, tmp_path)
    cal = b.manifest["quantization"]["calibration"]
    assert cal["method"] == method and ("QUANTILE" if method == "percentile" else "HISTOGRAM") in cal["nncf"]
    mine = _activation_ranges(b.path / "model.xml")
    ref = _activation_ranges(ov_bundle.path / "model.xml")
    shared = set(mine) & set(ref)
    assert shared and any(abs(mine[k] - ref[k]) > 0.02 * ref[k] for k in shared)
    if method == "percentile":
        assert all(mine[k] <= ref[k] * 1.0001 for k in shared)
    acc = b.manifest["accuracy"]
    assert acc["fp32_onnx"] - acc["target"] <= 1.0
