import numpy as np
import pytest

from edgebundle.core.errors import DataError
from edgebundle.exporters.onnx import cosine
from edgebundle.core.data import Split
from edgebundle.pipeline.runner import run_split
from edgebundle.stages.training import accuracy
from edgebundle.targets import registry
from edgebundle.targets import BuildContext
from edgebundle.targets.ort_cpu import OrtSession


def _build(prepared, tmp_path, calibration=None, options=None, cal_split=None):
    r = prepared.recipe
    spec = r.targets[0].model_copy(update={"calibration": calibration or r.targets[0].calibration})
    entry = registry.lookup("ort-cpu")
    opts = entry.options_model.model_validate(options or {})
    ctx = BuildContext(r, spec, opts, prepared.onnx.path("model.fp32.onnx"),
                       cal_split if cal_split is not None else prepared.dataset.calibration(r.data),
                       prepared.dataset.val, tmp_path, threads=2)
    return entry.factory().build(ctx)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_agrees_with_fp32(prepared, tmp_path, method):
    from edgebundle.core.recipe import CalibrationSpec

    built = _build(prepared, tmp_path, calibration=CalibrationSpec(method=method))
    assert built.precision == "int8" and built.quantization["calibration"]["method"] == method
    ds, specs = prepared.dataset, prepared.recipe.inputs
    q = run_split(OrtSession(tmp_path / built.model_file, threads=2), ds.test, specs)
    f = run_split(OrtSession(prepared.onnx.path("model.fp32.onnx"), threads=2), ds.test, specs)
    assert cosine(q, f) > 0.99
    assert (q.argmax(1) == f.argmax(1)).mean() > 0.97
    assert accuracy(f, ds.test.labels) - accuracy(q, ds.test.labels) <= 1.0


def test_int8_model_really_has_int8_weights(prepared, tmp_path):
    import onnx

    built = _build(prepared, tmp_path)
    m = onnx.load(str(tmp_path / built.model_file))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_inits = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8_inits, "weights must be stored as int8"
    assert (tmp_path / built.model_file).stat().st_size < 0.5 * prepared.onnx.path("model.fp32.onnx").stat().st_size


def _bad(prepared, x):
    return Split({"image": x}, None)


@pytest.mark.parametrize("make,msg", [
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32), "NaN/Inf"),
    (lambda x: np.full_like(x, np.inf), "NaN/Inf"),
    (lambda x: x[:0], "empty"),
    (lambda x: x[:, :, :4, :], r"per-sample shape \[1, 4, 8\]"),
    (lambda x: x.astype(np.int64), "dtype int64"),
])
def test_bad_calibration_data_fails_before_any_scale(prepared, tmp_path, make, msg):
    x = prepared.dataset.train.inputs["image"][:16]
    with pytest.raises(DataError, match=msg):
        _build(prepared, tmp_path, cal_split=_bad(prepared, make(x)))
    assert not (tmp_path / "model.onnx").exists()


def test_strided_calibration_gives_the_same_scales_as_holding_everything(prepared, tmp_path):
    """Calibration runs in strides (bounded memory, bench/calib_memory.py); MinMax merged over strides must
    equal MinMax over all samples at once."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgebundle.calibration.readers import SplitReader
    from edgebundle.targets.common import calib_stride

    assert calib_stride(128) == 16 and calib_stride(30) == 15 and calib_stride(17) == 1
    (tmp_path / "a").mkdir()
    built = _build(prepared, tmp_path / "a", options={"layer_errors": False, "accuracy_control": False})
    assert built.quantization["calibration"]["samples"] == 128
    r = prepared.recipe
    pre, ref = tmp_path / "pre.onnx", tmp_path / "ref.onnx"
    quant_pre_process(str(prepared.onnx.path("model.fp32.onnx")), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(ref), SplitReader(prepared.dataset.calibration(r.data), r.inputs),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=built.quantization["reduce_range"])

    def scales(p):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer if t.name.endswith("_scale")}

    a, b = scales(tmp_path / "a" / "model.onnx"), scales(ref)
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k]) for k in a)
