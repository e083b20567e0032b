"""The embedded default, checked the way a user would check a bundle."""

import json

from edgebundle.pipeline.bundle import read_manifest, verify_files
from edgebundle.core.artifact import sha256_file


def _manifest(default_run):
    return default_run.bundles[0].manifest


def test_bundle_layout_and_hashes(default_run):
    b = default_run.bundles[0]
    assert b.path == default_run.output / "ort-cpu"
    assert sorted(p.name for p in b.path.iterdir()) == ["SHA256SUMS", "manifest.json", "model.onnx"]
    m = read_manifest(b.path)
    for name, entry in m.files.items():
        assert sha256_file(b.path / name) == entry.sha256
        assert (b.path / name).stat().st_size == entry.bytes
    assert verify_files(b.path) == []
    assert sorted(p.name for p in default_run.output.iterdir()) == [".locks", ".work", "openvino", "ort-cpu", "report.html"], \
        "no temporary folders left beside the bundles"


def test_student_is_smaller_and_accurate(default_run):
    m = _manifest(default_run)
    prune = next(s for s in m["lineage"] if s["stage"] == "prune")["metrics"]
    assert prune["macs_after"] <= 0.6 * prune["macs_before"]
    acc = m["accuracy"]
    assert acc["student_pytorch"] >= acc["teacher_pytorch"] - 3.0
    assert acc["teacher_pytorch"] > 90.0


def test_int8_within_one_point_of_fp32(default_run):
    acc = _manifest(default_run)["accuracy"]
    assert acc["drop_vs_fp32"] <= 1.0 and acc["within_budget"] is True
    assert acc["output_cosine_vs_fp32"] > 0.99
    assert _manifest(default_run)["target"]["precision"] == "int8"


def test_latency_and_host_fields(default_run):
    m = _manifest(default_run)
    lat = m["latency"]
    for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_per_s"):
        assert lat[k] > 0, k
    assert lat["p50_ci95_ms"][0] <= lat["p50_ms"] <= lat["p50_ci95_ms"][1]
    assert lat["iterations"] == len(lat["samples_ms"]) == 300
    assert lat["threads"] == m["target"]["runtime"]["threads"] >= 1
    assert m["reference_latency"]["pytorch_fp32_teacher"]["p50_ms"] > 0
    assert m["speedup"]["vs_pytorch_fp32_teacher"] > 0
    host = m["host"]
    assert host["cpu"] and "isa" in host and host["versions"]["onnxruntime"]


def test_manifest_records_lineage_io_and_quantization(default_run):
    m = _manifest(default_run)
    assert [s["stage"] for s in m["lineage"]] == ["teacher", "prune", "distill", "export", "build:ort-cpu"]
    assert m["lineage"][1]["config"]["prune"]["ratio"] == 0.5
    assert m["inputs"] == [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert m["outputs"][0]["name"] == "logits"
    q = m["quantization"]
    assert q["format"] == "QDQ" and q["activations"] == "uint8" and q["per_channel"]
    # weights auto: int8, or on a CPU without VNNI 8-bit uint8 where 7-bit int8 gave up more (recorded why)
    assert q["weights"] == "int8" or (q["weights"] == "uint8" and q["weights_auto"]["chose"] == "uint8")
    assert q["calibration"] == {"method": "minmax", "samples": 128}
    assert m["schema_version"] == 2 and m["recipe"]["name"] == "digits-cnn"


def test_unchanged_recipe_does_no_work(default_run, tmp_path):
    from conftest import default_recipe
    from edgebundle.pipeline.runner import prepare

    events = []
    prepare(default_recipe(), default_run.output / ".work",
            on_event=lambda kind, stage, **k: events.append((kind, stage, k.get("cached"))))
    starts = [(s, c) for kind, s, c in events if kind == "start"]
    assert starts == [("teacher", True), ("prune", True), ("distill", True), ("export", True),
                      ("data", True)]


def test_changed_stage_reruns_it_and_what_follows_only(default_run):
    from conftest import make_recipe
    from edgebundle.pipeline.runner import prepare

    r = default_run.prepared.recipe
    changed = r.model_copy(update={"stages": r.stages.model_copy(
        update={"distill": r.stages.distill.model_copy(update={"epochs": 2})})})
    events = []
    p = prepare(changed, default_run.output / ".work",
                on_event=lambda kind, stage, **k: events.append((kind, stage, k.get("cached"))))
    starts = dict((s, c) for kind, s, c in events if kind == "start")
    assert starts == {"teacher": True, "prune": True, "distill": False, "export": False, "data": True}
    assert p.student.key != default_run.prepared.student.key
