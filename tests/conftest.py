"""Shared fixtures: the embedded default runs once per pytest session; stages reuse its cache."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
import yaml

from edgebundle.core.recipe import default_recipe_text, recipe_from_dict

torch.set_num_threads(2)


def default_dict() -> dict:
    return yaml.safe_load(default_recipe_text())


def make_recipe(base_dir: Path, **overrides):
    """The default recipe with top-level keys (or 'stages.x' dotted keys) replaced."""
    d = copy.deepcopy(default_dict())
    for key, value in overrides.items():
        node, *rest = key.split("__")
        if rest:
            d.setdefault(node, {})[rest[0]] = value
        else:
            d[node] = value
    return recipe_from_dict(d, base_dir=base_dir)


def prepared_copy(default_run, tmp_path: Path, **changes):
    """A recipe file (the default with top-level `changes`) prepared into a copy of the default's work
    folder: every stage the changes do not touch is a cache hit. Returns (recipe path, work folder)."""
    import shutil

    from edgebundle.core.recipe import load_recipe
    from edgebundle.pipeline.runner import prepare

    d = copy.deepcopy(default_dict())
    d.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    work = tmp_path / "work"
    shutil.copytree(default_run.output / ".work", work, ignore=shutil.ignore_patterns(".lock*"))
    prepare(load_recipe(path), work)
    return path, work


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """RunResult of the embedded default recipe (trains teacher, prunes, distills, exports, ORT int8)."""
    from edgebundle.core.recipe import load_recipe
    from edgebundle.pipeline.runner import run

    out = tmp_path_factory.mktemp("default") / "bundles"
    events = []
    result = run(load_recipe(None), output=out, on_event=lambda kind, stage, **k: events.append((kind, stage, k)))
    return SimpleNamespace(prepared=result.prepared, bundles=result.bundles, output=out, events=events)


@pytest.fixture(scope="session")
def prepared(default_run):
    return default_run.prepared


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def pytest_configure(config):
    config.addinivalue_line("markers", "openvino: needs openvino and nncf")
    config.addinivalue_line("markers", "tensorrt: needs the tensorrt Python package (pip install edgebundle[tensorrt])")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU with CUDA")


def pytest_collection_modifyitems(config, items):
    reasons = {}
    if _missing("openvino") or _missing("nncf"):
        reasons["openvino"] = "openvino/nncf not installed"
    if _missing("tensorrt"):
        reasons["tensorrt"] = "tensorrt not installed (pip install edgebundle[tensorrt] on a machine with NVIDIA's index)"
    if not torch.cuda.is_available():
        reasons["gpu"] = "no NVIDIA GPU with CUDA on this machine"
    for item in items:
        for mark, why in reasons.items():
            if mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))
