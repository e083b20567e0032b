"""Cache keys are a contract with every work folder already on disk: the payload each stage hashes (stage
name, config, parents, extra inputs) is pinned here, so moving code around provably keeps caches valid.

Regenerate the golden file only for an intended change of a stage's key:
    EDGEBUNDLE_PIN_CACHE_KEYS=1 python -m pytest tests/test_cache_keys.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgebundle.pipeline import cache
from edgebundle.core.data import load_dataset
from edgebundle.core.modelio import source_fingerprint
from conftest import default_recipe

GOLDEN = Path(__file__).resolve().parent / "data" / "cache_payloads.json"


def _payloads(recipe, work: Path) -> list[dict]:
    from edgebundle.pipeline.runner import prepare

    src = source_fingerprint(recipe.model, recipe.base_dir)
    data = load_dataset(recipe).fingerprint
    names = {src + data: "source+data", data: "data", "": ""}
    seen: list[dict] = []
    original = cache.StageCache.key

    def spy(self, stage, config, parents, extra=""):
        seen.append({"stage": stage, "config": json.loads(json.dumps(config, default=str)),
                     "parents": [p.stage for p in parents], "extra": names.get(extra, "other")})
        return original(self, stage, config, parents, extra)

    cache.StageCache.key = spy
    try:
        prepare(recipe, work)
    finally:
        cache.StageCache.key = original
    return seen


def test_stage_cache_payloads_are_pinned(default_run):
    got = _payloads(default_recipe(), default_run.output / ".work")
    if os.environ.get("EDGEBUNDLE_PIN_CACHE_KEYS"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(GOLDEN.read_text())
    assert [p["stage"] for p in got] == ["teacher", "prune", "distill", "export", "data"]
