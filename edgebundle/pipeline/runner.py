"""The pipeline's entry points: `run` (prepare + build for every selected target), and, re-exported,
`prepare` / `load_prepared` (edgebundle.pipeline.prepare) and `build` / `build_target`
(edgebundle.pipeline.build). The runner, not each stage or target, checks preconditions, caches by content,
records lineage, owns evaluation and timing, and wraps a failure with the names of the stages before it.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from edgebundle.core.data import Dataset, Split, load_dataset, run_outputs, run_split  # noqa: F401  (re-exported)
from edgebundle.core.recipe import Recipe
from edgebundle.pipeline.build import _build_all, _select, build, build_target  # noqa: F401  (re-exported)
from edgebundle.pipeline.lock import target_lock
from edgebundle.pipeline.prepare import PREPARED_FILE, Event, _noop, load_prepared, prepare  # noqa: F401  (re-exported)
from edgebundle.pipeline.records import RunResult


def run(recipe: Recipe, *, output: Path | None = None, targets: list[str] | None = None,
        work: Path | None = None, on_event: Event = _noop, pack: bool = False,
        keep_rejected: bool = False) -> RunResult:
    """prepare + build for every (selected) target. The library's main entry point."""
    output = Path(output) if output is not None else recipe.output
    selected = _select(recipe, targets, output)
    fresh = not output.exists()
    try:
        with contextlib.ExitStack() as locks:
            # every target's lock first: a second run into the same folder fails now, not after training
            for spec in selected:
                locks.enter_context(target_lock(output, spec.name))
            prepared = prepare(recipe, work or output / ".work", on_event=on_event)
            return RunResult(prepared, _build_all(prepared, selected, output, on_event, pack, keep_rejected))
    except BaseException:  # bad input, a crash, Ctrl-C: a folder this run made and left empty goes
        if fresh:
            _remove_if_empty(output)
        raise


def _remove_if_empty(output: Path) -> None:
    """A run that failed before making anything leaves no folder behind: the output folder it created goes when
    it holds only lock files and empty folders (a stage artifact stays: the next run resumes from it)."""
    if not output.is_dir():
        return
    files = [p for p in output.rglob("*") if not p.is_dir()]
    if all(p.suffix == ".lock" for p in files):
        shutil.rmtree(output, ignore_errors=True)
