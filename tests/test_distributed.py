"""Distillation under `torchrun --nproc-per-node 2` on CPU (gloo): DDP, one artifact, the same cache key."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ddp_work(default_run, tmp_path_factory):
    """The default's work folder without its distill and export artifacts, re-prepared by torchrun."""
    work = tmp_path_factory.mktemp("ddp") / "work"
    shutil.copytree(default_run.output / ".work", work,
                    ignore=shutil.ignore_patterns("distill-*", "export-*", "prepared.json", ".prepare.lock"))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", "-m", "edgebundle.cli", "prepare", "-o", str(work)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return work, res


def test_ddp_student_matches_single_process_accuracy(default_run, ddp_work):
    work, _ = ddp_work
    doc = json.loads((work / "prepared.json").read_text())
    rec = json.loads((work / doc["artifacts"]["student"] / "artifact.json").read_text())
    assert rec["stage"] == "distill"
    single = default_run.prepared.student.metrics["test_accuracy"]
    assert abs(rec["metrics"]["test_accuracy"] - single) <= 1.0, (rec["metrics"]["test_accuracy"], single)


def test_ddp_writes_one_artifact_under_the_same_key(default_run, ddp_work):
    work, res = ddp_work
    distills = sorted(p.name for p in work.iterdir() if p.name.startswith("distill-"))
    assert distills == [default_run.prepared.student.folder.name]  # same key as the single-process run
    assert not [p for p in work.iterdir() if ".tmp-" in p.name]
    assert res.stdout.count("prepared ") == 1  # only rank 0 reports


def test_run_under_torchrun_points_to_prepare(monkeypatch):
    from typer.testing import CliRunner

    from edgebundle.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, ["run"])
    assert r.exit_code == 2 and "edgebundle prepare" in r.output


def test_every_training_stage_under_torchrun_finishes(tmp_path):
    """teacher (DDP), distill (DDP) and cluster with a fine-tune (rank 0 alone, outside DDP) from a fresh work
    folder under 2 gloo processes. The cluster fine-tune used to wait in DDP for ranks that never came: a
    regression fails here on the timeout instead of hanging."""
    import yaml

    from conftest import default_dict

    d = default_dict()
    d["stages"]["train"]["epochs"] = 3
    d["stages"]["distill"]["epochs"] = 3
    d["stages"]["cluster"] = {"enabled": True, "clusters": 16, "finetune_epochs": 1}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    work = tmp_path / "work"
    try:
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                              "-m", "edgebundle.cli", "prepare", str(recipe), "-o", str(work)],
                             cwd=ROOT, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun prepare with a cluster fine-tune did not finish in {e.timeout} s (hang)")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stages = {json.loads((p / "artifact.json").read_text())["stage"]: json.loads((p / "artifact.json").read_text())
              for p in work.iterdir() if (p / "artifact.json").is_file()}
    assert {"teacher", "prune", "distill", "cluster", "export", "data"} <= set(stages)
    assert stages["cluster"]["metrics"]["finetune_best_val_accuracy"] > 50.0
    assert stages["teacher"]["metrics"]["trained"] is True


def test_more_processes_than_gpus_on_a_node_is_one_line():
    """NCCL takes one GPU per process: local rank 1 on a one-GPU node is refused in one line before CUDA
    fails with 'invalid device ordinal' (seen under torchrun --nproc-per-node 2 on a one-GPU machine)."""
    from edgebundle.core.distributed import check_local_rank
    from edgebundle.core.errors import RecipeError

    check_local_rank(0, 1)
    with pytest.raises(RecipeError, match="local rank 1 on a node with 1 GPU.*--nproc-per-node 1"):
        check_local_rank(1, 1)
