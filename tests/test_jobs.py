"""Per-target build jobs: `prepare` into a work folder, `build` from it (elsewhere, concurrently), locks."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgebundle.cli import app
from edgebundle.core.errors import BundleError
from edgebundle.pipeline.bundle import verify_files
from edgebundle.pipeline.runner import PREPARED_FILE, build, load_prepared, prepare

from conftest import default_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def moved_work(default_run, tmp_path_factory):
    """The default's work folder, prepared by the CLI (all stages cached) and then moved elsewhere,
    as a CI artifact would be."""
    import yaml

    from conftest import default_dict

    work = default_run.output / ".work"
    recipe = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(default_dict()))  # the default as the session ran it (int8)
    r = runner.invoke(app, ["prepare", str(recipe), "-o", str(work)])
    assert r.exit_code == 0, r.output
    dest = tmp_path_factory.mktemp("ci-artifact") / "work"
    shutil.copytree(work, dest, ignore=shutil.ignore_patterns(".prepare.lock"))
    return dest


def test_prepare_records_the_prepared_artifacts(default_run, moved_work):
    doc = json.loads((moved_work / PREPARED_FILE).read_text())
    p = default_run.prepared
    assert doc["artifacts"]["onnx"] == p.onnx.folder.name and doc["artifacts"]["student"] == p.student.folder.name
    again = load_prepared(moved_work)
    assert again.onnx.key == p.onnx.key and again.recipe == p.recipe.model_copy(update={"base_dir": again.recipe.base_dir})
    assert len(again.dataset.test) == len(p.dataset.test)
    assert (again.dataset.test.labels == p.dataset.test.labels).all()


def test_build_from_a_moved_work_folder_matches_run(default_run, moved_work, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["build", str(moved_work), "--target", "ort-cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "ort-cpu" / "manifest.json").read_text())
    ref = default_run.bundles[0].manifest
    assert [a["key"] for a in m["lineage"][:-1]] == [a["key"] for a in ref["lineage"][:-1]]
    # same student, same calibration data, same quantizer: the same int8 model and accuracy
    assert m["files"]["model.onnx"]["sha256"] == ref["files"]["model.onnx"]["sha256"]
    assert m["accuracy"]["target"] == ref["accuracy"]["target"]
    assert verify_files(out / "ort-cpu") == []
    assert (out / "report.html").is_file() and not (out / "openvino").exists()


def test_build_refuses_a_changed_work_folder(moved_work, tmp_path):
    bad = tmp_path / "work"
    shutil.copytree(moved_work, bad)
    doc = json.loads((bad / PREPARED_FILE).read_text())
    onnx = bad / doc["artifacts"]["onnx"] / "model.fp32.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    r = runner.invoke(app, ["build", str(bad), "-t", "ort-cpu", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "model.fp32.onnx is missing or changed since it was prepared" in r.output
    assert not (tmp_path / "out" / "ort-cpu").exists()


def test_build_needs_a_prepared_folder_and_the_same_recipe(moved_work, tmp_path):
    r = runner.invoke(app, ["build", str(tmp_path), "-t", "ort-cpu"])
    assert r.exit_code == 2 and "is not a prepared work folder" in r.output
    changed = default_recipe().model_copy(update={"seed": 1})
    with pytest.raises(Exception, match="differs from the one prepared"):
        load_prepared(moved_work, changed)


def test_unknown_target_in_build(moved_work, tmp_path):
    r = runner.invoke(app, ["build", str(moved_work), "-t", "tensorrt-nope", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "unknown target 'tensorrt-nope'" in r.output and "ort-cpu" in r.output


_HOLD = """
import sys, time
from pathlib import Path
from edgebundle.pipeline.lock import target_lock
with target_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_writer_of_a_bundle_gets_in_use(moved_work, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), "ort-cpu"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BundleError, match="in use by another edgebundle process"):
            build(moved_work, targets=["ort-cpu"], output=out)
        assert not (out / "ort-cpu").exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the lock with the killed process: no stale lock to clean up
    build(moved_work, targets=["ort-cpu"], output=out)
    assert verify_files(out / "ort-cpu") == []


@pytest.mark.openvino
def test_per_target_builds_fan_out_against_one_work_folder(moved_work, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "edgebundle.cli", "build", str(moved_work), "-t", t,
                               "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for t in ("ort-cpu", "openvino")]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    for t in ("ort-cpu", "openvino"):
        assert verify_files(out / t) == []
    names = sorted(p.name for p in out.iterdir())
    assert names == [".locks", "openvino", "ort-cpu", "report.html"]  # no temporary folders left
    # the report is rewritten under a lock by each job: the last writer saw both bundles
    assert "ort-cpu" in (out / "report.html").read_text() and "openvino" in (out / "report.html").read_text()
