"""Quantization-aware distillation (edgebundle.calibration.qat, PT2E): it starts on the post-training grid,
and the ExecuTorch target records it. That it repairs a real model post-training int8 puts over budget is
shown on EfficientNet-Lite in test_real.py."""

import numpy as np
import pytest
import torch

from edgebundle.core.data import Split
from edgebundle.core.isa import has_vnni, host_isa

pytest.importorskip("executorch", reason="the executorch package is not installed (pip install edgebundle[mobile])")


def _xnnpack(qat: bool):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    from edgebundle.calibration.qat import fake_quant_config
    from edgebundle.calibration.pt2e import xnnpack_quantizer as _xnnpack_quantizer

    config = get_symmetric_quantization_config(is_per_channel=True)
    return _xnnpack_quantizer().set_global(fake_quant_config(config) if qat else config)


def test_qat_starts_on_the_post_training_grid_and_keeps_the_best_epoch(prepared):
    """With no training, the QAT program is the post-training program (same observers, same calibration,
    frozen): outputs equal up to float rounding. Trained, the kept epoch scores best on validation inputs,
    ties broken by the distillation loss there."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgebundle.calibration.qat import capture, qat_pt2e

    model = prepared.load_student().eval()
    ds, specs = prepared.dataset, prepared.recipe.inputs
    cal = ds.calibration(prepared.recipe.data)
    x = torch.from_numpy(np.asarray(ds.test.inputs["image"]))
    with torch.no_grad():
        ref = model(x).numpy()
    ptq = prepare_pt2e(capture(model, cal, specs).module(), _xnnpack(False))
    with torch.no_grad():
        for i in range(0, len(cal), 16):
            ptq(torch.from_numpy(np.asarray(cal.inputs["image"][i:i + 16])))
        ptq_out = convert_pt2e(ptq)(x).numpy()
    assert not np.allclose(ptq_out, ref, atol=1e-3)  # int8 really changed the outputs

    def agreement(out):
        return float((out.argmax(1) == ref[:len(out)].argmax(1)).mean() * 100)

    val = Split({"image": np.asarray(ds.test.inputs["image"])}, None)
    kw = dict(val_reference=ref, score=agreement, loss="kl", lr=1e-4, batch_size=16, temperature=2.0, seed=0)
    start = qat_pt2e(model, _xnnpack(True), ds.train, cal, val, specs, epochs=0, **kw)
    with torch.no_grad():
        start_out = start.model(x).numpy()
    scale = np.abs(ref).max()
    assert np.abs(start_out - ptq_out).max() <= 0.01 * scale and agreement(start_out) == agreement(ptq_out)
    assert start.best_epoch == -1 and start.history == [agreement(ptq_out)]

    trained = qat_pt2e(model, _xnnpack(True), ds.train, cal, val, specs, epochs=2, **kw)
    assert len(trained.history) == 3 and trained.history[trained.best_epoch + 1] == max(trained.history)
    with torch.no_grad():
        assert agreement(trained.model(x).numpy()) == max(trained.history)
    # a contract already met ties at every epoch: the distillation loss on the validation inputs decides
    tied = qat_pt2e(model, _xnnpack(True), ds.train, cal, val, specs, epochs=2, **dict(kw, score=lambda out: 0.0))
    assert tied.history == [0.0] * 3 and tied.best_epoch + 1 == int(np.argmin(tied.distill_loss))
    # patience: a score that peaks at the first epoch stops the fine-tune two epochs later, that epoch kept
    scores = iter([50.0, 90.0] + [80.0 - i for i in range(20)])
    early = qat_pt2e(model, _xnnpack(True), ds.train, cal, val, specs, epochs=10, patience=2,
                     **dict(kw, score=lambda out: next(scores)))
    assert early.epochs_run == 3 and early.history == [50.0, 90.0, 80.0, 79.0] and early.best_epoch == 0


def test_the_qat_switch_reads_yaml_on_and_off_and_refuses_anything_else():
    import pydantic
    import yaml

    from edgebundle.targets.executorch_xnnpack import ExecutorchOptions

    read = lambda text: ExecutorchOptions.model_validate(yaml.safe_load(text)).qat  # noqa: E731
    assert read("qat: {enabled: on}").enabled == "on" and read("qat: {enabled: off}").enabled == "off"
    assert read("{}").enabled == "auto" and read("qat: {epochs: 5}").epochs == 5
    with pytest.raises(pydantic.ValidationError, match="'auto', 'on' or 'off'"):
        read("qat: {enabled: sometimes}")


def test_qat_on_without_training_inputs_says_so(prepared, tmp_path):
    from edgebundle.core.errors import StageError
    from edgebundle.core.recipe import TargetSpec
    from edgebundle.targets import BuildContext
    from edgebundle.targets.executorch_xnnpack import ExecutorchOptions, ExecutorchTarget

    r = prepared.recipe
    ctx = BuildContext(r, TargetSpec(name="executorch"),
                       ExecutorchOptions(precision="int8", also_fp32=False, qat={"enabled": "on"}),
                       prepared.onnx.path("model.fp32.onnx"), prepared.dataset.calibration(r.data).head(8),
                       prepared.dataset.val, tmp_path, threads=2, load_model=prepared.load_student, train=None)
    with pytest.raises(StageError, match="qat enabled 'on' needs training inputs"):
        ExecutorchTarget().build(ctx)


class _SamePadNet(torch.nn.Module):
    """TensorFlow-style "same" padding (an asymmetric zero pad before each strided conv), ReLU6, a residual
    add: the shapes in EfficientNet-Lite that ONNX Runtime's int8 fusions are picky about."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.b = torch.nn.Conv2d(8, 8, 3, groups=8)
        self.c = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.a(torch.nn.functional.pad(x, (0, 1, 0, 1))))
        y = torch.nn.functional.relu6(self.b(torch.nn.functional.pad(x, (1, 1, 1, 1))))
        x = x + self.c(y)
        return self.head(x.mean((2, 3)))


def _ort_ops(path, tmp_path):
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("weight_bits", [8, 7])
def test_a_pt2e_program_exports_to_qdq_onnx_that_onnxruntime_runs_in_integer_kernels(tmp_path, weight_bits):
    """exporters.qdq: the converted PT2E program as Q/DQ ONNX computes what the program computes (ORT vs
    PyTorch within two output quantization steps), and with the pads on their input's scale (F.relu6's
    output here) every conv and the add run as ONNX Runtime integer kernels (QLinearConv, QLinearAdd) with
    no float conv left; only the pad of the float input image stays. 7-bit weights (-63..63, what ort-cpu's
    QAT trains for a CPU without VNNI) compute the program's integers on every x86 ISA; 8-bit weights only
    where VNNI sums u8 x s8 products in 32 bits (AVX2's pairwise multiply-add saturates)."""
    if weight_bits == 8 and not has_vnni(host_isa()):
        pytest.skip(f"8-bit weights saturate on this host's {host_isa()} (no VNNI): ORT computes otherwise here")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgebundle.calibration.pt2e import xnnpack_quantizer
    from edgebundle.calibration.qat import capture
    from edgebundle.core.recipe import InputSpec
    from edgebundle.core.session import OrtSession
    from edgebundle.exporters.qdq import export_qdq

    torch.manual_seed(0)
    model = _SamePadNet().eval()
    specs = [InputSpec(name="image", shape=[1, 3, 16, 16], dtype="float32", dynamic_axes={0: "batch"})]
    x = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    split = Split({"image": x}, None)
    program = prepare_pt2e(capture(model, split, specs).module(), xnnpack_quantizer(pads_share_input=True)
                           .set_global(get_symmetric_quantization_config(
                               is_per_channel=True, **({"weight_qmin": -63, "weight_qmax": 63} if weight_bits == 7
                                                       else {}))))
    with torch.no_grad():
        program(torch.from_numpy(x[:48]))
    program = convert_pt2e(program)
    done = export_qdq(program, specs, ["logits"], tmp_path / "q.onnx")
    assert done["pads_folded"] == 1  # the first pad's input is the float image: nothing to share
    with torch.no_grad():
        want = program(torch.from_numpy(x[48:])).numpy()
    with OrtSession(tmp_path / "q.onnx", threads=1) as s:
        got = s.run({"image": x[48:]})[0]
    step = np.abs(want).max() / 127  # about one quantization step of the output
    assert np.abs(got - want).max() <= 2 * step and (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    ops = _ort_ops(tmp_path / "q.onnx", tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1 and not ops["Conv"] and ops["Pad"] == 1, ops
    assert _weight_range(tmp_path / "q.onnx") == (63 if weight_bits == 7 else 127)


def _weight_range(path) -> int:
    """The largest |value| among the model's int8 initializers (its quantized weights)."""
    import onnx
    from onnx import numpy_helper

    ws = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return max(int(np.abs(w.astype(np.int16)).max()) for w in ws if w.size > 1)


def test_ort_cpu_ships_the_qat_program_as_qdq_onnx_in_integer_kernels(prepared, tmp_path):
    """ort-cpu with `qat: on`: the bundle's model.onnx is the QAT program exported as Q/DQ ONNX (not ORT's
    own post-training model), judged on the test split like any bundle, every conv in an integer kernel,
    and the manifest says how it was made."""
    import onnx

    from edgebundle.core.recipe import TargetSpec
    from edgebundle.pipeline.runner import build_target

    spec = TargetSpec.model_validate({"name": "ort-cpu", "measure": {"iterations": 10},
                                      "options": {"precision": "int8", "qat": {"enabled": "on", "epochs": 1}}})
    b = build_target(prepared, spec, tmp_path / "out", keep_rejected=True)
    q = b.manifest["quantization"]
    assert q["tool"].startswith("torchao PT2E QAT") and q["qat"]["epochs"] == 1 and "post_training" not in q
    assert [a.get("qat") for a in q["activations_tried_on_val"]] == [True]
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(prepared.onnx.path("model.fp32.onnx"))).graph.node)
    ops = _ort_ops(b.path / "model.onnx", tmp_path)
    assert convs and ops["QLinearConv"] == convs and not ops["Conv"], ops
    assert b.status == "complete" and b.manifest["accuracy"]["within_budget"], b.manifest["accuracy"]
    # a CPU without VNNI gets 7-bit weights (trained on that grid), judged natively: no pair sum can saturate
    seven = not has_vnni(host_isa())
    assert q["reduce_range"] is seven and _weight_range(b.path / "model.onnx") <= (63 if seven else 127)
    assert b.manifest["accuracy"]["isa"]["judged_on"] == "native"


def test_ort_cpu_qat_auto_tries_qat_when_int8_misses_and_keeps_post_training_when_qat_misses_too(prepared, tmp_path):
    """`qat: auto` (the default) with a budget no int8 model can hold (cosine to fp32 of exactly 1): full
    post-training int8 misses it on validation inputs, QAT runs and misses it too, so ORT's own model stays
    (accuracy control off) and the rejection line lists what was tried, QAT included."""
    from edgebundle.core.metrics import Contract, MetricSpec
    from edgebundle.core.recipe import TargetSpec
    from edgebundle.pipeline.runner import build_target

    spec = TargetSpec.model_validate({"name": "ort-cpu", "max_accuracy_drop": 0.0, "measure": {"iterations": 10},
                                      "options": {"precision": "int8", "accuracy_control": False,
                                                  "layer_errors": False, "qat": {"epochs": 1}}})
    b = build_target(prepared, spec, tmp_path / "out", contract=Contract("cosine", MetricSpec(name="cosine", min_cosine=1.0, min_mean_cosine=1.0), 0.0),
                     keep_rejected=True)
    q = b.manifest["quantization"]
    assert q["tool"] == "onnxruntime.quantization.quantize_static" and not q["accuracy_budget"]["within_budget"]
    (tried,) = q["activations_tried_on_val"]
    assert tried["qat"] is True and tried["within_budget"] is False and q["qat"]["epochs"] == 1
    assert b.status == "rejected" and "QAT static int8, 1 epochs" in b.reason, b.reason


def test_ort_cpu_qat_on_with_dynamic_int8_says_so(prepared, tmp_path):
    """`qat: on` fine-tunes a static program: asked beside dynamic int8 it is one StageError line, not a
    silently ignored switch."""
    from edgebundle.core.errors import StageError
    from edgebundle.core.recipe import TargetSpec
    from edgebundle.targets import BuildContext
    from edgebundle.targets.ort_cpu import OrtCpuOptions, OrtCpuTarget

    r = prepared.recipe
    ctx = BuildContext(r, TargetSpec(name="ort-cpu"),
                       OrtCpuOptions(precision="int8", mode="dynamic", qat={"enabled": "on"}),
                       prepared.onnx.path("model.fp32.onnx"), prepared.dataset.calibration(r.data).head(8),
                       prepared.dataset.val, tmp_path, threads=2, load_model=prepared.load_student,
                       train=prepared.dataset.train)
    with pytest.raises(StageError, match="qat enabled 'on' fine-tunes a static int8 program"):
        OrtCpuTarget().build(ctx)
