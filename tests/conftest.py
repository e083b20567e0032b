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
    """The embedded default with `precision: int8` on both targets: the tests exercise the int8 path, which
    the default's `precision: auto` ships only where int8 is faster on the host running them."""
    d = yaml.safe_load(default_recipe_text())
    for t in d["targets"]:
        t.setdefault("options", {})["precision"] = "int8"
    return d


def default_recipe():
    return recipe_from_dict(default_dict(), base_dir=Path.cwd(), source="(embedded default, int8)")


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
    """RunResult of the embedded default recipe with int8 forced (trains teacher, prunes, distills, exports,
    ORT and OpenVINO int8)."""
    from edgebundle.pipeline.runner import run

    out = tmp_path_factory.mktemp("default") / "bundles"
    events = []
    result = run(default_recipe(), output=out, on_event=lambda kind, stage, **k: events.append((kind, stage, k)))
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
    config.addinivalue_line("markers", "litert: needs litert-torch and ai-edge-litert (pip install edgebundle[litert])")
    config.addinivalue_line("markers", "slow: 8 s or more on 2 cores; `pytest -m 'not slow'` is the quick subset")


# What the quick subset (`pytest -m "not slow"`) leaves out: modules and tests that took 8 s or more each on 2
# cores (`pytest --durations=0`); the whole suite (the README's command, CI) runs them all.
SLOW_MODULES = {"test_real.py", "test_encoder.py", "test_hf.py", "test_distributed.py", "test_plugins.py",
                "test_mobile.py", "test_qat.py"}
SLOW_TESTS = {
    "test_a_student_that_memorized_its_photos_is_rejected_when_judged_on_photos_it_never_saw",
    "test_int8_that_holds_on_the_host_but_saturates_on_avx2_is_refused",
    "test_precision_auto_makes_the_same_choice_on_a_loaded_host",
    "test_over_budget_target_exits_1_and_leaves_no_bundle",
    "test_precision_auto_ships_the_faster_and_records_both",
    "test_sigkill_at_several_points_then_rerun_finishes_from_the_cache",
    "test_sigterm_mid_run_is_one_line_and_leaves_nothing_half_written",
    "test_user_code_that_swallows_the_time_limit_still_ends_with_one_line",
    "test_peak_memory_stays_flat_as_the_image_folder_grows",
    "test_per_target_builds_fan_out_against_one_work_folder",
    "test_a_run_logged_to_a_file_shows_each_stage_and_epoch_as_it_happens",
    "test_the_search_keeps_a_structure_that_holds_and_refuses_one_that_does_not",
    "test_a_pruned_start_that_holds_the_budget_is_not_distilled_by_the_search",
    "test_a_search_out_of_time_ships_the_unpruned_model_and_says_so",
    "test_unlabelled_inputs_join_distillation_and_their_held_out_groups_check_the_student",
    "test_the_search_refuses_a_candidate_that_misses_the_held_out_groups",
}


def pytest_collection_modifyitems(config, items):
    reasons = {}
    if _missing("openvino") or _missing("nncf"):
        reasons["openvino"] = "openvino/nncf not installed"
    if _missing("tensorrt"):
        reasons["tensorrt"] = "tensorrt not installed (pip install edgebundle[tensorrt] on a machine with NVIDIA's index)"
    if _missing("litert_torch") or _missing("ai_edge_litert"):
        reasons["litert"] = "litert-torch / ai-edge-litert not installed (pip install edgebundle[litert])"
    if not torch.cuda.is_available():
        reasons["gpu"] = "no NVIDIA GPU with CUDA on this machine"
    for item in items:
        if item.path.name in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        for mark, why in reasons.items():
            if mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))
