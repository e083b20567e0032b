"""`edgebundle check`: real bundles, real timing; the slow candidate is the unpruned model (4x MACs)."""

import json
import shutil
from xml.etree import ElementTree as ET

import pytest
from typer.testing import CliRunner

from conftest import make_recipe
from edgebundle.cli import app
from edgebundle.core.errors import BundleError
from edgebundle.pipeline.bundle import write_bundle
from edgebundle.pipeline.check import check
from edgebundle.pipeline.runner import build_target, prepare

runner = CliRunner()


@pytest.fixture(scope="module")
def fast(default_run):
    return default_run.bundles[0].path  # pruned + distilled, ort-cpu int8


@pytest.fixture(scope="module")
def slow(default_run, tmp_path_factory):
    """The same recipe without pruning: the unpruned teacher, exported and bundled for ort-cpu."""
    base = default_run.prepared.recipe
    r = base.model_copy(update={"stages": base.stages.model_copy(update={
        "prune": base.stages.prune.model_copy(update={"enabled": False}),
        "distill": base.stages.distill.model_copy(update={"enabled": False})})})
    p = prepare(r, default_run.output / ".work")
    out = tmp_path_factory.mktemp("slow")
    return build_target(p, r.targets[0].model_copy(update={"measure": r.targets[0].measure.model_copy(
        update={"iterations": 50})}), out).path


def test_same_bundle_is_not_a_regression(fast):
    res = check(fast, fast, rounds=12, per_round=20)
    assert res.mode == "interleaved" and not res.regression
    assert 0.8 < res.ratio < 1.25 and res.ratio_ci95[0] <= res.ratio <= res.ratio_ci95[1]


def test_bigger_model_is_a_latency_regression(fast, slow, tmp_path):
    res = check(slow, fast, rounds=12, per_round=20)
    assert res.latency_regression and res.regression and res.ratio > 1.05 and res.ratio_ci95[0] > 1.0
    junit = tmp_path / "check.xml"
    # the teacher is also 0.55 points less accurate than the distilled student: isolate latency here
    r = runner.invoke(app, ["check", str(slow), "--baseline", str(fast), "--rounds", "16", "--junit", str(junit),
                            "--accuracy-tolerance", "1.0"])
    assert r.exit_code == 1, r.output
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "1"
    assert suite.find("testcase[@name='latency']/failure") is not None


def test_faster_candidate_passes(fast, slow):
    r = runner.invoke(app, ["check", str(fast), "--baseline", str(slow), "--rounds", "8", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["verdict"] == "ok" and d["ratio"] < 1.0 and d["mode"] == "interleaved"


def _manifest_only(bundle, dest, edit=None):
    dest.mkdir()
    m = json.loads((bundle / "manifest.json").read_text())
    if edit:
        edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest / "manifest.json"


def test_manifest_only_baseline_is_a_weaker_comparison(fast, tmp_path):
    base = _manifest_only(fast, tmp_path / "base")
    res = check(fast, base)
    assert res.mode == "recorded"
    assert any("weaker" in n for n in res.notes)


def test_different_host_refused_unless_allowed(fast, tmp_path):
    base = _manifest_only(fast, tmp_path / "base", lambda m: m["host"].update(id="0123456789abcdef"))
    with pytest.raises(BundleError, match="different hosts"):
        check(fast, base)
    r = runner.invoke(app, ["check", str(fast), "--baseline", str(base)])
    assert r.exit_code == 2 and "--allow-different-host" in r.output
    res = check(fast, base, allow_different_host=True)
    assert res.different_host and any("different hosts" in n for n in res.notes)


def test_accuracy_regression(fast, tmp_path):
    m = json.loads((fast / "manifest.json").read_text())
    m.pop("files")
    m["accuracy"]["target"] -= 2.0

    def fill(tmp):  # a consistent bundle (hashes match) that records a lower accuracy
        shutil.copy(fast / "model.onnx", tmp / "model.onnx")
        return m

    cand = write_bundle(tmp_path, "ort-cpu", fill)
    res = check(cand, fast, rounds=4, per_round=5)
    assert res.accuracy_regression and res.regression
    assert not check(cand, fast, rounds=4, per_round=5, accuracy_tolerance=2.5).accuracy_regression


def test_different_targets_are_an_error(default_run):
    ort, ov = (b.path for b in default_run.bundles)
    r = runner.invoke(app, ["check", str(ort), "--baseline", str(ov)])
    assert r.exit_code == 2 and "same target" in r.output
