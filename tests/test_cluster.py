"""Weight clustering on the embedded default: shared values, compressed bundle size, accuracy cost."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgebundle.core.recipe import TargetSpec
from edgebundle.pipeline.runner import build_target, prepare


@pytest.fixture(scope="module")
def clustered(default_run):
    r = default_run.prepared.recipe
    rc = r.model_copy(update={"stages": r.stages.model_copy(update={"cluster": r.stages.cluster.model_copy(
        update={"enabled": True, "clusters": 16, "finetune_epochs": 3})})})
    return prepare(rc, default_run.output / ".work")


def _bundles(prepared, out, **options):
    spec = TargetSpec(name="ort-cpu", options={"precision": "int8", **options}, measure={"iterations": 30})
    return build_target(prepared, spec, out).manifest


def test_cluster_stage_shares_values_and_keeps_accuracy(default_run, clustered):
    art = clustered.student
    assert art.stage == "cluster" and [a.stage for a in clustered.lineage][-3:] == ["distill", "cluster", "export"]
    m = art.metrics
    assert m["layers"] and all(v <= 2 * 16 for v in m["distinct_values"].values())
    assert m["clustered_params"] > 0.9 * m["total_params"]
    assert m["test_accuracy"] >= default_run.prepared.student.metrics["test_accuracy"] - 1.0


def test_clustered_bundle_compresses_to_half(default_run, clustered, tmp_path):
    """fp32 bundles: <= 0.5x gzip size at <= 1 point; int8: the int8 codes stay shared (<= 2K per layer)."""
    base32 = _bundles(default_run.prepared, tmp_path / "b32", precision="fp32")
    clu32 = _bundles(clustered, tmp_path / "c32", precision="fp32")
    assert clu32["size"]["gzip_bytes"] <= 0.5 * base32["size"]["gzip_bytes"], (clu32["size"], base32["size"])
    assert clu32["size"]["raw_bytes"] == base32["size"]["raw_bytes"]  # same shapes: the gain is compression
    assert clu32["accuracy"]["target"] >= base32["accuracy"]["target"] - 1.0
    base8 = _bundles(default_run.prepared, tmp_path / "b8")
    clu8 = _bundles(clustered, tmp_path / "c8")
    assert clu8["size"]["gzip_bytes"] < 0.8 * base8["size"]["gzip_bytes"]
    assert clu8["accuracy"]["target"] >= base8["accuracy"]["target"] - 1.0
    m = onnx.load(str(tmp_path / "c8" / "ort-cpu" / "model.onnx"))
    layers = {f"{n}.weight_quantized" for n in clustered.student.metrics["layers"]}
    codes = [np.unique(numpy_helper.to_array(t)).size for t in m.graph.initializer if t.name in layers]
    assert len(codes) == len(layers) and max(codes) <= 2 * 16  # per-channel int8 kept the sharing
