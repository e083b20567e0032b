"""The LiteRT target: the student converted to .tflite by litert-torch (no TensorFlow), int8 by PT2E, run by
ai_edge_litert's interpreter with XNNPACK, held to the recipe's contract like every target."""

from __future__ import annotations

import numpy as np
import pytest

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
