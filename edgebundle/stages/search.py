"""Stage `search`: `prune: {ratio: auto}` finds the structure by measurement instead of a guessed ratio.

Each candidate structure (a channel ratio; for models with attention also a head ratio; for models with
blocks that keep their input's shape a depth ratio, whole blocks dropped) is pruned from the original model,
quantized as the recipe's first target builds it, judged on the validation split against the original model's
outputs and timed interleaved against the unpruned model quantized the same way (the pipeline's pricer does the
last three: stages do not import targets); where it misses the budget so, it gets a short distillation and is
priced again. Within each family candidates go
from mild to strong, and a family stops at its first candidate over budget. The fastest candidate within
budget that is faster than the unpruned model is the result; none: nothing is pruned, and the run says so.
`prune` then prunes the original with it and `distill` gives it the full distillation, and the bundle is
judged again on the test split.

Rows are kept in the work folder as they are priced, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgebundle.core import progress
from edgebundle.core.artifact import Artifact
from edgebundle.core.data import Split
from edgebundle.core.errors import EdgeBundleError, StageError
from edgebundle.core.modelio import image_inputs
from edgebundle.core.recipe import PruneStage, Recipe
from edgebundle.stages.base import StageBase, StageContext, dump, without_defaults
from edgebundle.stages.distill import judged_metric
from edgebundle.stages.depth import block_list, dropped_count
from edgebundle.stages.pruning import SIMD_ROUNDS, attention_modules, prune
from edgebundle.stages.registry import register_stage
from edgebundle.stages.training import distill

SEARCH_FILE = "search.json"
PRICING = 7  # how candidates are priced: rows kept from another way of pricing are not reused
HEAD_RATIOS = (0.25, 0.5)


@dataclass(frozen=True)
class Candidate:
    ratio: float = 0.0
    head_ratio: float = 0.0
    depth_ratio: float = 0.0
    importance: str = ""  # which channels go; "": the recipe's prune.importance
    input_scale: float = 1.0  # the share of the image inputs' height and width the network sees

    def own(self) -> dict[str, Any]:
        """The fields this candidate sets (those away from their defaults)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def record(self) -> dict[str, Any]:
        """The candidate as rows and the kept structure record it: the three ratios always, importance and
        input_scale only where they are the candidate's own."""
        return {"ratio": self.ratio, "head_ratio": self.head_ratio, "depth_ratio": self.depth_ratio, **self.own()}

    @property
    def label(self) -> str:
        own = self.own()
        parts = [f"{k.replace('_', ' ')} {v:g}" for k, v in own.items() if k != "importance"]
        parts += [f"importance {own['importance']}"] if "importance" in own else []
        return ", ".join(parts) or "unpruned"

    def config(self, cfg: PruneStage) -> PruneStage:
        return cfg.model_copy(update={**self.record(), "input_scale": self.input_scale})


def families(cfg: PruneStage, model: nn.Module, example) -> list[list[Candidate]]:
    """The candidates, by family, each from mild to strong: channels (by the recipe's importance, and by FPGM);
    heads where the model has attention modules; depth where its largest list of blocks has blocks that keep
    their input's shape (encoder layers, residual blocks)."""
    ratios = sorted(set(cfg.search_ratios))
    out = [[Candidate(ratio=r) for r in ratios]]
    if cfg.importance in ("magnitude", "lamp"):  # which channels go matters as much as how many (EfficientNet-
        # Lite1: magnitude at 5 % costs its confident crops, FPGM keeps 84 % of them): the geometric median's
        # choice too, beside a weight-norm ranking (the data-aware ones, taylor and activation, stand alone)
        out.append([Candidate(ratio=r, importance="fpgm") for r in ratios])
    if attention_modules(model):
        out.append([Candidate(head_ratio=h) for h in HEAD_RATIOS])
    found = block_list(model, example)
    if found is not None:
        out.append([Candidate(depth_ratio=d) for d in depth_ratios(len(found[2]), cfg.search_depth_ratios)])
    if image_inputs(example):
        out.append([Candidate(input_scale=s) for s in sorted(set(cfg.search_input_scales), reverse=True)])
    return [f for f in out if f]


def together(kept: list[Candidate]) -> Candidate | None:
    """The strongest candidate within budget of each family that had one, together (two families or more), as
    long as they set different fields: e.g. two blocks dropped, and the rest shown 0.87 of the image's side."""
    merged: dict[str, Any] = {}
    used = 0
    for cand in kept:
        own = cand.own()
        if own and not set(own) & set(merged):
            merged.update(own)
            used += 1
    return Candidate(**merged) if used > 1 else None


def depth_ratios(droppable: int, ratios: list[float]) -> list[float]:
    """`ratios` (prune.search_depth_ratios) that drop different numbers of `droppable` blocks (of those that drop
    as many, the largest: its label is nearest the share dropped). The default's on EfficientNet-Lite1's 14
    residual blocks: 4, 5 and 7 dropped; on six encoder layers: 2 and 3."""
    by_count = {dropped_count(droppable, d): d for d in sorted(ratios)}
    return [by_count[k] for k in sorted(by_count) if k > 0]


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest priced candidate within budget that is faster than the unpruned model beyond the timing's
    noise (the lower end of its speed-up's 95 % interval above 1 and above the upper end of the unpruned
    model's against itself); else the unpruned model."""
    base = next((r for r in rows if r["candidate"] == Candidate().record() and "speedup_ci95" in r), None)
    floor = max(1.0, base["speedup_ci95"][1]) if base else 1.0
    fit = [r for r in rows if r.get("within") and r["candidate"] != Candidate().record()
           and r.get("speedup_ci95", [0])[0] > floor]
    best = max(fit, key=lambda r: r["speedup"]) if fit else None
    return dict(best["candidate"]) if best else Candidate().record()


@register_stage
class Search(StageBase):
    name = "search"
    label = "search (structure, measured)"
    after = ("teacher",)
    before = ("prune",)

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.stages.prune.enabled and recipe.stages.prune.searched

    def one_output(self, recipe: Recipe) -> bool:
        return self.enabled(recipe)

    def config(self, ctx: StageContext) -> dict[str, Any]:
        r = ctx.recipe
        return {"prune": without_defaults(r.stages.prune, "input_scale", "search_input_scales", "search_samples"),
                "distill": dump(r.stages.distill), "seed": r.seed,
                "target": dump(r.targets[0]), "export": dump(r.stages.export), "metric": dump(r.metric),
                "round_to_auto": list(SIMD_ROUNDS)}

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return [ctx.artifacts["teacher"]]

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        if ctx.pricer is None:
            raise StageError("prune.ratio auto prices candidates on a target; this run has no pricer")
        cfg = ctx.recipe.stages.prune
        teacher = ctx.load(ctx.artifacts["teacher"])
        rows_file = self._rows_file(ctx)
        done = {json.dumps(r["candidate"], sort_keys=True): r for r in _read_rows(rows_file)}
        start = time.monotonic() - sum(r.get("seconds", 0.0) for r in done.values())
        pricer = ctx.pricer(ctx, teacher)
        price = functools.partial(self._price, ctx, pricer, teacher, judged_metric(ctx))
        try:
            rows = [self._row(price, Candidate(), done, rows_file, 0.0)]

            def strongest_within(family: list[Candidate]) -> list[Candidate]:
                """Price `family` mild to strong until one is over budget; its strongest within budget, or []."""
                held: list[Candidate] = []
                for cand in family:
                    why = out_of_time(rows, time.monotonic() - start, cfg.search_minutes * 60)
                    row = (_not_tried(cand, why) if why else
                           self._row(price, cand, done, rows_file, time.monotonic() - start))
                    rows.append(row)
                    if not row.get("within"):
                        break  # stronger candidates of this family would not hold either
                    held = [cand]
                return held

            kept = [c for family in families(cfg, teacher, ctx.example) for c in strongest_within(family)]
            both = together(kept)
            if both is not None:
                strongest_within([both])
        finally:
            pricer.close()
        chosen = choose(rows)
        out = {"target": pricer.target, "reference": "original", "split": "val", "rows": rows, "chosen": chosen,
               "chosen_label": Candidate(**chosen).label, "minutes": round((time.monotonic() - start) / 60, 2),
               "search_minutes": cfg.search_minutes}
        out["outcome"] = _outcome(out)
        (folder / SEARCH_FILE).write_text(json.dumps(out, indent=1))
        progress.report("note", text=out["outcome"])
        return out

    def _rows_file(self, ctx: StageContext) -> Path | None:
        if ctx.work is None:
            return None
        key = hashlib.sha256(json.dumps([self.config(ctx), ctx.artifacts["teacher"].key, ctx.dataset.fingerprint,
                                         PRICING],
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        return ctx.work / "search" / f"{key}.jsonl"

    @staticmethod
    def _row(price, cand: Candidate, done: dict, rows_file: Path | None, elapsed: float) -> dict[str, Any]:
        """The candidate's row: kept from an interrupted search, or priced now (`price(cand)`) and kept."""
        key = json.dumps(cand.record(), sort_keys=True)
        if key in done:
            row = done[key]
        else:
            t0 = time.monotonic()
            row = {"candidate": cand.record(), "label": cand.label}
            try:
                row.update(price(cand))
            except EdgeBundleError as e:
                row.update(status="failed", within=False, why=str(e))
            row["seconds"] = round(time.monotonic() - t0, 1)
            if rows_file is not None:
                rows_file.parent.mkdir(parents=True, exist_ok=True)
                with rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        progress.report("candidate", text=_row_text(row), elapsed_s=round(elapsed))
        return row

    @staticmethod
    def _price(ctx: StageContext, pricer, teacher: nn.Module, metric: str, cand: Candidate) -> dict[str, Any]:
        """Prune the candidate from the original and price it. Where the recipe distils, its pruned start is priced
        first: one that holds the budget is not distilled (the search's verdict would not change, and the one kept
        gets the full distillation); one over budget gets its short distillation and is priced again where an
        epoch beat the start."""
        recipe, ds = ctx.recipe, ctx.dataset
        student = copy.deepcopy(teacher)
        if cand == Candidate():
            return _with_status(pricer.price(student.cpu().eval(), check_fp32=False))
        rep = prune(student, cand.config(recipe.stages.prune), ctx.example, train=ds.train, names=ctx.names,
                    metric=metric)
        facts: dict[str, Any] = dict(macs_ratio=round(rep.macs_ratio, 4), params=rep.params_after, macs=rep.macs_after,
                                     heads_removed=sum(b - a for b, a in rep.heads.values()),
                                     blocks_kept=next(iter(rep.blocks.values())) if rep.blocks else None)
        priced = pricer.price(student.cpu().eval())
        d = recipe.stages.distill
        if d.enabled and recipe.stages.prune.search_epochs > 0:
            if priced.get("within"):
                facts["start_held"] = True  # no distillation: the pruned start holds the budget as it is
            else:
                short = d.model_copy(update={"epochs": recipe.stages.prune.search_epochs, "patience": None})
                learn = _learns_from(ds.distill_train, recipe.stages.prune.search_samples, recipe.seed)
                with progress.listening(lambda *_a, **_k: None):  # the candidate's epochs are not the stage's
                    fit = distill(student, teacher, learn, ds.val, ctx.names, short, seed=recipe.seed,
                                  device=ctx.device, metric=metric, specs=recipe.inputs,
                                  pretrained=ctx.pretrained, budget=recipe.metric)
                facts["distill_" + fit.metric] = round(fit.best_val_accuracy, 6)
                facts["distill_best_epoch"] = fit.best_epoch  # -1: no epoch did better than the pruned start
                if fit.best_epoch >= 0:  # else the student is its start, priced already
                    priced = pricer.price(student.cpu().eval())
        return _with_status({**facts, **priced})


def _with_status(row: dict[str, Any]) -> dict[str, Any]:
    """A priced row with its status, as the search's table says it."""
    return {**row, "status": "within budget" if row.get("within") else "over budget"}


def _learns_from(train: Split, samples: int | None, seed: int) -> Split:
    """What each candidate's short distillation learns from: `samples` of `train` (prune.search_samples; the same
    random ones, in their order, for every candidate), or all of it."""
    if samples is None or samples >= len(train):
        return train
    return train.take(np.sort(np.random.default_rng(seed).permutation(len(train))[:samples]))


def _read_rows(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run: that candidate is priced again
    return rows


def out_of_time(rows: list[dict[str, Any]], elapsed_s: float, budget_s: float) -> str | None:
    """Why the next candidate is not started (None: it is): search_minutes has run out, or would before it
    ends, as it takes as long as the longest pruned candidate priced so far (the search keeps to its minutes
    instead of overrunning them by one candidate)."""
    if elapsed_s > budget_s:
        return "search_minutes ran out"
    took = [r["seconds"] for r in rows[1:] if "seconds" in r]
    if took and elapsed_s + max(took) > budget_s:
        return f"search_minutes ran out: {elapsed_s / 60:.1f} min spent, a candidate takes up to {max(took) / 60:.1f}"
    return None


def _not_tried(cand: Candidate, why: str) -> dict[str, Any]:
    return {"candidate": cand.record(), "label": cand.label, "status": "not tried", "within": False, "why": why}


def start_kept(row: dict[str, Any], form: str = "{}") -> str:
    """What a row's short distillation did, put in `form`, where it left the student as pruned ("" where it
    changed it)."""
    if row.get("start_held"):
        return form.format("the pruned start held the budget: not distilled")
    return form.format("no distillation epoch beat the pruned start") if row.get("distill_best_epoch") == -1 else ""


def _row_text(row: dict[str, Any]) -> str:
    if row.get("status") in ("failed", "not tried"):
        return f"{row['label']}: {row['status']} ({row.get('why', '')})"
    if row["candidate"] == Candidate().record():
        return (f"unpruned (the baseline, built twice: {row['speedup']:.2f}x is the timing's noise): {row['line']} "
                f"vs original ({row['status']})")
    if row.get("fp32_over"):
        return (f"{row['label']}: {row.get('summary') or row['line']} vs original (over budget before int8: not "
                f"built{start_kept(row, '; {}')})")
    if row.get("held_out_over"):
        return (f"{row['label']}: {row['summary']} vs original (over budget on the held-out groups no stage learns "
                f"from: not built{start_kept(row, '; {}')})")
    kept = f", {row['layers_kept_float']} layers kept float in int8" if row.get("layers_kept_float") else ""
    return (f"{row['label']}: {row['speedup']:.2f}x the unpruned model{kept}, {row.get('summary') or row['line']} "
            f"vs original ({row['status']}{start_kept(row, '; {}')})")


def _outcome(out: dict[str, Any]) -> str:
    chosen = out["chosen_label"]
    if chosen == "unpruned":
        priced = sum(1 for r in out["rows"][1:] if r.get("status") in ("within budget", "over budget"))
        left = sum(1 for r in out["rows"] if r.get("status") == "not tried")
        return (f"search: no pruned structure held the budget and ran faster on {out['target']} ({priced} priced"
                f"{f', {left} not tried: search_minutes ran out' if left else ''}); the unpruned model is kept")
    row = next(r for r in out["rows"] if r["label"] == chosen)
    return f"search: kept {chosen} ({row['speedup']:.2f}x the unpruned model on {out['target']}, {row['line']})"
