"""Quantization-aware distillation (edgebundle.calibration.qat, PT2E): it starts on the post-training grid,
and the ExecuTorch target records it. That it repairs a real model post-training int8 puts over budget is
shown on EfficientNet-Lite in test_real.py."""

import numpy as np
import pytest
import torch

from edgebundle.core.data import Split

pytest.importorskip("executorch", reason="the executorch package is not installed (pip install edgebundle[mobile])")


def _xnnpack(qat: bool):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    from edgebundle.calibration.qat import fake_quant_config
    from edgebundle.targets.executorch_xnnpack import _xnnpack_quantizer

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
