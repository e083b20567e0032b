"""TensorRT target. The Q/DQ preparation, its placement rules, its int8 accuracy (through ONNX Runtime),
the pending bundle and the portability guard run everywhere; engine build and GPU timing need tensorrt
and an NVIDIA GPU (markers `tensorrt`, `gpu`)."""

import json

import onnx
import pytest
from typer.testing import CliRunner

from edgebundle.cli import app
from edgebundle.pipeline.bundle import read_manifest, verify_files
from edgebundle.core.recipe import TargetSpec
from edgebundle.pipeline.runner import build_target
from edgebundle.targets.tensorrt import (
    PENDING, QDQ_FILE, WEIGHTED_OPS, engine_pending_reason, portability_problem, qdq_problems,
)

runner = CliRunner()
ENGINE_HERE = engine_pending_reason() is None


@pytest.fixture(scope="module")
def trt_bundle(prepared, tmp_path_factory):
    spec = TargetSpec(name="tensorrt", measure={"iterations": 50})
    return build_target(prepared, spec, tmp_path_factory.mktemp("trt"))


def test_qdq_model_follows_tensorrt_rules(trt_bundle):
    m = onnx.load(str(trt_bundle.path / QDQ_FILE))
    assert qdq_problems(m) == []
    ops = [n.op_type for n in m.graph.node]
    weighted = [n for n in m.graph.node if n.op_type in WEIGHTED_OPS]
    assert weighted and ops.count("DequantizeLinear") >= 2 * len(weighted)
    # only the weighted layers' inputs are quantized: no Q/DQ elsewhere (e.g. not on Relu/pool outputs
    # that feed non-weighted ops), and every zero point is int8 0
    consumers = {i: n.op_type for n in m.graph.node for i in n.input}
    dq_outputs = [n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert {consumers[o] for o in dq_outputs} <= set(WEIGHTED_OPS)


def test_placement_rules_catch_a_model_tensorrt_would_mishandle(default_run):
    """The ORT-CPU bundle is QDQ with uint8 asymmetric activations: fine for ORT, wrong for TensorRT."""
    m = onnx.load(str(default_run.bundles[0].path / "model.onnx"))
    problems = qdq_problems(m)
    assert problems and any("TensorRT needs int8" in p for p in problems)


def test_int8_qdq_accuracy_through_onnx_runtime(trt_bundle):
    acc = trt_bundle.manifest["accuracy"]
    assert acc["target"] is not None and acc["drop_vs_fp32"] <= 1.0
    assert acc["output_cosine_vs_fp32"] > 0.99
    q = trt_bundle.manifest["quantization"]
    assert q["activations"].startswith("int8 symmetric") and "placement_checked" in q


@pytest.mark.skipif(ENGINE_HERE, reason="tensorrt and a GPU are present: the bundle is complete here")
def test_without_gpu_the_bundle_is_pending_and_says_so(trt_bundle):
    m = read_manifest(trt_bundle.path)
    assert m.target.status == "pending" and m.target.exercised is False
    assert m.target.runtime["engine"] == PENDING and "needs an NVIDIA GPU" in PENDING
    assert m.latency is None and m.speedup["vs_pytorch_fp32_teacher"] is None
    assert any("no engine was built and no GPU latency was measured" in n for n in m.notes)
    assert sorted(p.name for p in trt_bundle.path.iterdir()) == ["SHA256SUMS", "manifest.json", QDQ_FILE]
    assert verify_files(trt_bundle.path) == []


@pytest.mark.skipif(ENGINE_HERE, reason="tensorrt and a GPU are present: the bundle is complete here")
def test_check_refuses_a_pending_bundle(trt_bundle):
    r = runner.invoke(app, ["check", str(trt_bundle.path), "--baseline", str(trt_bundle.path)])
    assert r.exit_code == 2 and "is pending" in r.output


def test_build_tensorrt_from_a_work_folder_cli(default_run, tmp_path):
    """`edgebundle build WORK --target tensorrt`: the target need not be listed in the recipe."""
    work = default_run.output / ".work"
    assert runner.invoke(app, ["prepare", "-o", str(work)]).exit_code == 0
    r = runner.invoke(app, ["build", str(work), "-t", "tensorrt", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "tensorrt" / "manifest.json").read_text())
    assert m["target"]["status"] == ("complete" if ENGINE_HERE else "pending")
    assert "tensorrt" in (tmp_path / "report.html").read_text()


def test_portability_guard():
    built = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.7.0", "cuda": "12.6"}
    assert portability_problem(built, dict(built)) is None
    other_gpu = {**built, "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    assert "built for GPU 'NVIDIA H100 80GB HBM3'" in portability_problem(built, other_gpu)
    other_trt = {**built, "tensorrt": "10.8.0"}
    assert "TensorRT '10.7.0'" in portability_problem(built, other_trt)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_built_and_timed_on_the_gpu(trt_bundle):
    m = read_manifest(trt_bundle.path)
    assert m.target.status == "complete" and m.target.exercised
    assert (trt_bundle.path / "model.int8.engine").is_file() and (trt_bundle.path / "timing.cache").is_file()
    assert (trt_bundle.path / "model.fp16.engine").is_file()
    assert m.latency["p50_ms"] > 0 and m.target.runtime["engine_built_for"]["gpu"]


@pytest.mark.skipif(ENGINE_HERE, reason="tensorrt and a GPU are present: the target is fully available")
def test_targets_command_says_tensorrt_is_only_partly_available():
    r = runner.invoke(app, ["targets"])
    assert r.exit_code == 0
    line = next(l for l in r.output.splitlines() if "tensorrt" in l and "int8" in l)
    assert "partly" in line
    if "not installed" in line:  # off a terminal (a pipe, a log) each row is one whole line: the hint is not cut
        assert line.endswith("(pip install edgebundle[tensorrt]))")


@pytest.mark.skipif(ENGINE_HERE, reason="tensorrt and a GPU are present: the engine is judged on the GPU")
def test_the_pending_qdq_model_is_judged_with_exact_integer_sums_as_the_gpu_computes(tmp_path):
    """A digits CNN whose first convolution has large weights of one sign: its 8-bit u8 x s8 pair sums over bright
    pixels saturate on CPUs without VNNI in ONNX Runtime's fused QLinearConv. A GPU accumulates int8 in 32 bits, so the pending Q/DQ model is judged on ONNX
    Runtime with no graph optimisation (each DequantizeLinear, then the float layer: the exact integer sum
    times its scales), not in the host's fused integer kernels: within budget on every host. On an AVX2 host
    the fused kernels give what no GPU computes (measured: EfficientNet-Lite1 95.2 % against 100 %)."""
    import numpy as np
    import yaml

    from edgebundle.core.data import run_outputs
    from edgebundle.core.isa import has_vnni, host_isa
    from edgebundle.core.recipe import load_recipe
    from edgebundle.core.session import OrtSession
    from edgebundle.pipeline.runner import run

    d = {"version": 1, "name": "saturating", "model": {"factory": "factories:saturating_conv"},
         "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32", "dynamic_axes": {0: "batch"}}],
         "outputs": ["logits"], "data": {"kind": "digits", "calibration_samples": 64},
         "metric": {"name": "snr", "min_snr_db": 30},
         "stages": {"train": {"enabled": False}, "prune": {"enabled": False}, "distill": {"enabled": False}},
         "targets": [{"name": "tensorrt", "options": {"precision": "int8", "accuracy_control": False}}],
         "output": str(tmp_path / "out")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).with_name("factories.py"), tmp_path / "factories.py")
    res = run(load_recipe(tmp_path / "r.yaml"), keep_rejected=True)
    (b,) = res.bundles
    acc = b.manifest["accuracy"]
    assert b.status == "pending" and acc["within_budget"], (b.status, b.reason, acc)
    test = res.prepared.dataset.test
    with OrtSession(res.prepared.onnx.path("model.fp32.onnx"), threads=2) as s:
        ref = run_outputs(s, test, res.prepared.recipe.inputs)[0]
    snr = {}
    for level in ("disable", "all"):
        with OrtSession(b.path / QDQ_FILE, threads=2, level=level) as s:
            out = run_outputs(s, test, res.prepared.recipe.inputs)[0]
        snr[level] = 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum())
    assert snr["disable"] >= 30
    if not has_vnni(host_isa()):  # the host's fused kernels saturate where the GPU's sums do not
        assert snr["all"] < 30, snr
