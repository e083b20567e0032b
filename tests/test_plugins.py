"""Adding a target (and a stage) is one file: a module outside the package, declared through an entry point,
runs end to end through `edgebundle run` with no edit to edgebundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import default_dict

PLUGINS = Path(__file__).resolve().parent / "plugins"


def _installed(tmp_path: Path, group: str, name: str, module: str) -> dict[str, str]:
    """A distribution's metadata on the path (what `pip install` of a plugin package leaves), declaring
    `module` in the entry-point `group`: the environment of a process that has the plugin installed."""
    dist = tmp_path / "site" / f"edgebundle_plugin_{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: edgebundle-plugin-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}\n")
    path = os.pathsep.join([str(tmp_path / "site"), str(PLUGINS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _run(tmp_path: Path, recipe: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return subprocess.run([sys.executable, "-m", "edgebundle.cli", "run", str(tmp_path / "r.yaml"), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900)


def _small(**changes) -> dict:
    d = default_dict()
    d["stages"].update(train={"enabled": True, "epochs": 2}, prune={"enabled": False},
                       distill={"enabled": False})
    d.update(changes)
    return d


def test_a_target_in_one_file_runs_end_to_end_through_an_entry_point(tmp_path):
    env = _installed(tmp_path, "edgebundle.targets", "echo", "echo_target")
    recipe = _small(targets=[{"name": "echo", "measure": {"iterations": 10}, "options": {"note": "from a plugin"}}])
    res = _run(tmp_path, recipe, env)
    assert res.returncode == 0, res.stdout + res.stderr
    m = json.loads((tmp_path / "out" / "echo" / "manifest.json").read_text())
    assert m["target"]["name"] == "echo" and m["target"]["status"] == "complete"
    assert m["accuracy"]["within_budget"] and "from a plugin" in m["notes"]
    # without the plugin installed, the same recipe is one line naming what exists
    res = _run(tmp_path, recipe, {**os.environ})
    assert res.returncode == 2 and "unknown target 'echo'" in res.stdout + res.stderr


def test_a_stage_in_one_file_runs_end_to_end_with_its_own_recipe_config(tmp_path):
    env = _installed(tmp_path, "edgebundle.stages", "scale", "scale_stage")
    recipe = _small(targets=[{"name": "ort-cpu", "measure": {"iterations": 10}, "options": {"precision": "fp32"}}])
    recipe["stages"]["scale"] = {"enabled": True, "factor": 2.0}
    res = _run(tmp_path, recipe, env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "scale (logits)" in res.stdout  # its declared label on the progress line
    m = json.loads((tmp_path / "out" / "ort-cpu" / "manifest.json").read_text())
    stages = [e["stage"] for e in m["lineage"]]
    assert stages.index("teacher") < stages.index("scale") < stages.index("export"), stages
    assert next(e for e in m["lineage"] if e["stage"] == "scale")["metrics"]["factor"] == 2.0
    # it changed the model the user brought: judged end to end, against the original
    acc = m["accuracy"]
    assert acc["reference"] == "original" and acc["chain"][1]["by"] == ["scale"]
    # its config is validated by its own class, before any work
    recipe["stages"]["scale"] = {"enabled": True, "factor": -1}
    res = _run(tmp_path, recipe, env)
    assert res.returncode == 2 and "stages.scale.factor" in res.stdout + res.stderr
    # without the plugin, its key is unknown
    recipe["stages"]["scale"] = {"enabled": True}
    res = _run(tmp_path, recipe, {**os.environ})
    assert res.returncode == 2 and "unknown key 'stages.scale'" in res.stdout + res.stderr
