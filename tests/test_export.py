import onnx
import pytest
import torch

import factories
from edgebundle.core.errors import StageError
from edgebundle.exporters.onnx import check_parity, export
from edgebundle.core.recipe import ExportStage, InputSpec

SPECS = [InputSpec(name="image", shape=[1, 1, 8, 8], dynamic_axes={0: "batch"})]


def test_export_is_checked_and_dynamic(prepared, tmp_path):
    path = prepared.onnx.path("model.fp32.onnx")
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert [i.name for i in m.graph.input] == ["image"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 20
    parity = prepared.onnx.metrics["parity"][0]
    assert parity["output"] == "logits" and parity["max_abs"] < 1e-3 and parity["cosine"] > 0.9999


def test_parity_failure_names_output_and_numbers(prepared, tmp_path):
    model = prepared.load_student()
    with torch.no_grad():
        model.classifier.bias.add_(0.5)  # the ONNX file no longer matches this model
    with pytest.raises(StageError, match=r"parity failed for output 'logits': max_abs=0\.5"):
        check_parity(model, prepared.onnx.path("model.fp32.onnx"), prepared.dataset.test, SPECS, ["logits"],
                     ExportStage())


def test_unexportable_op_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=r"cannot export .*No ONNX function found for .*opaque_scale"):
        export(factories.custom_op_net().eval(), SPECS, ["logits"], ExportStage(), tmp_path / "m.onnx")


def test_batch_axis_really_dynamic(prepared):
    from edgebundle.targets.ort_cpu import OrtSession

    s = OrtSession(prepared.onnx.path("model.fp32.onnx"), threads=1)
    x = prepared.dataset.test.inputs["image"]
    for n in (1, 7, 64):
        assert s.run({"image": x[:n]})[0].shape == (n, 10)


def test_the_exported_file_has_the_opset_asked_for(tmp_path):
    """The dynamo exporter converts down from its own opset, and its converter gives up on some models (the
    digits CNN at 17) leaving a file at 18: auto then exports with TorchScript at 17; dynamo by name says so."""
    from edgebundle.zoo import digits_cnn

    def default_opset(path):
        return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))

    model = digits_cnn(width=8).eval()
    for opset in (17, 18, 20):
        which = export(model, SPECS, ["logits"], ExportStage(opset=opset), tmp_path / f"m{opset}.onnx")
        assert default_opset(tmp_path / f"m{opset}.onnx") == opset, (opset, which)
    try:
        export(model, SPECS, ["logits"], ExportStage(opset=17, exporter="dynamo"), tmp_path / "d.onnx")
    except StageError as e:
        assert "wrote opset 18, not the opset 17 asked for" in str(e)
    else:
        assert default_opset(tmp_path / "d.onnx") == 17
