"""Mobile targets: ExecuTorch `.pte` (XNNPACK, PT2E int8) and ONNX Runtime Mobile `.ort`, on the default."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgebundle.core.errors import StageError
from edgebundle.pipeline.bundle import verify_files
from edgebundle.core.recipe import TargetSpec
from edgebundle.pipeline.runner import build_target, run_split
from edgebundle.stages.training import accuracy
from edgebundle.targets import registry
from edgebundle.targets import BuildContext
from edgebundle.targets.executorch_xnnpack import ExecutorchOptions, ExecutorchSession, ExecutorchTarget


@pytest.fixture(scope="module")
def et_bundle(prepared, tmp_path_factory):
    return build_target(prepared, TargetSpec(name="executorch", measure={"iterations": 50}, options={"precision": "int8"}),
                        tmp_path_factory.mktemp("et"))


@pytest.fixture(scope="module")
def ort_mobile_bundle(prepared, tmp_path_factory):
    return build_target(prepared, TargetSpec(name="ort-mobile", measure={"iterations": 50}, options={"precision": "int8"}),
                        tmp_path_factory.mktemp("ortm"))


def test_pte_loads_and_int8_is_within_a_point_of_fp32(prepared, et_bundle):
    m = et_bundle.manifest
    assert sorted(m["files"]) == ["model.fp32.pte", "model.pte"] and verify_files(et_bundle.path) == []
    acc = m["accuracy"]
    assert abs(acc["target"] - acc["student_pytorch"]) <= 1.0 and acc["drop_vs_fp32"] <= 1.0
    # re-load the program independently of the build and score it on the test split
    s = ExecutorchSession(et_bundle.path / "model.pte", ["image"])
    logits = run_split(s, prepared.dataset.test, prepared.recipe.inputs)
    assert accuracy(logits, prepared.dataset.test.labels) == acc["target"]
    assert m["latency"]["p50_ms"] > 0 and m["reference_latency"]["executorch_fp32_student"]["p50_ms"] > 0


def test_delegation_coverage_is_recorded(et_bundle):
    d = et_bundle.manifest["target"]["runtime"]["delegation"]
    assert d["delegated_nodes"] > 10 and d["delegated_fraction"] >= 0.9
    assert d["macs"] > 0 and d["non_delegated_macs"] == 0 and d["delegated_compute"] == 1.0
    assert d["delegated_subgraphs"] >= 1 and isinstance(d["non_delegated_ops"], list)
    assert any("not on a phone" in n for n in et_bundle.manifest["notes"])


class _WithCumsum(nn.Module):
    """A conv net with a cumulative sum XNNPACK has no kernel for: it stays on the portable kernels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x)).cumsum(-1)
        return self.fc(y.mean((2, 3)))


def test_low_delegation_coverage_fails_loudly(prepared, tmp_path):
    r = prepared.recipe
    spec = TargetSpec(name="executorch")
    ctx = BuildContext(r, spec, ExecutorchOptions(min_delegated_fraction=0.99, also_fp32=False),
                       prepared.onnx.path("model.fp32.onnx"), prepared.dataset.calibration(r.data).head(8),
                       prepared.dataset.val, tmp_path, threads=2, load_model=lambda: _WithCumsum().eval())
    with pytest.raises(StageError, match=r"XNNPACK took only \d+% .*cumsum"):
        ExecutorchTarget().build(ctx)


class _WithDoubleLinear(nn.Module):
    """Most of its multiply-accumulates in a float64 Linear, which XNNPACK does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(512, 512).double()
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x)).flatten(1)
        return self.head(self.fc(y.double()).float())


def test_undelegated_compute_fails_loudly_whatever_the_node_count(prepared, tmp_path):
    r = prepared.recipe
    ctx = BuildContext(r, TargetSpec(name="executorch"),
                       ExecutorchOptions(precision="fp32", min_delegated_fraction=0.0, also_fp32=False),
                       prepared.onnx.path("model.fp32.onnx"), prepared.dataset.calibration(r.data).head(8),
                       prepared.dataset.val, tmp_path, threads=2, load_model=lambda: _WithDoubleLinear().eval())
    with pytest.raises(StageError, match=r"XNNPACK took only \d+% of the program's multiply-accumulates"):
        ExecutorchTarget().build(ctx)


def test_ort_file_round_trips_and_has_the_reduced_build_config(prepared, ort_mobile_bundle):
    m = ort_mobile_bundle.manifest
    assert sorted(m["files"]) == ["model.ort", "required_operators.config"]
    rt = m["target"]["runtime"]
    assert rt["target_platform"] == "arm" and rt["ort_vs_onnx_max_abs_diff"] <= 1e-4
    config = (ort_mobile_bundle.path / "required_operators.config").read_text()
    assert "ai.onnx;" in config and "DequantizeLinear" in config
    s = ort.InferenceSession(str(ort_mobile_bundle.path / "model.ort"), providers=["CPUExecutionProvider"])
    x = prepared.dataset.test.inputs["image"]
    logits = s.run(None, {"image": x})[0]
    assert accuracy(logits, prepared.dataset.test.labels) == m["accuracy"]["target"]
    assert m["accuracy"]["drop_vs_fp32"] <= 1.0


def test_mobile_targets_are_registered_with_their_extra():
    assert registry.lookup("executorch").capabilities.extra == "mobile"
    assert registry.lookup("ort-mobile").capabilities.runtime == "onnxruntime"
