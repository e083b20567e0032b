"""Pricing a candidate model for the structure search (stage `search`): exported to ONNX, built as the
recipe's first target builds its int8 artifact, judged on the validation split against the original model's
outputs, and timed in interleaved rounds against the unpruned model built the same way, on this host."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgebundle.calibration.accuracy import layers_kept_float
from edgebundle.core.data import run_outputs
from edgebundle.core.errors import StageError
from edgebundle.core.host import usable_cores
from edgebundle.core.measure import interleaved_ratio, time_block
from edgebundle.exporters.onnx import export
from edgebundle.pipeline.evaluate import (check_held_out_resolvable, contract_for, held_out_contract, judged_output,
                                         measure_feeds, verdict_summary)
from edgebundle.stages.base import StageContext
from edgebundle.targets import BuildContext, registry

ROUNDS, PER_ROUND = 12, 5
# each timed block at least this long: two sessions alternating in short blocks disturb each other (a runtime's
# worker threads spin on after a run), which on 2 cores scattered one model against itself from 0.5x to 2x
BLOCK_MS = 250.0


def _int8_form(q: dict[str, Any]) -> dict[str, Any]:
    """What the candidate's int8 build gave up to its accuracy control (layers kept float: they time as
    float, so its speed-up is the structure's and theirs together), and whether QAT made it."""
    kept = len(layers_kept_float(q))
    return {**({"layers_kept_float": kept} if kept else {}), **({"qat": True} if q.get("qat") else {})}


class TargetPricer:
    """Opened once per search: the unpruned model's artifact stays open as the timing baseline."""

    def __init__(self, ctx: StageContext, original: nn.Module) -> None:
        recipe, ds = ctx.recipe, ctx.dataset
        self.ctx, self.spec = ctx, recipe.targets[0]
        self.target = self.spec.name  # what the search's table names
        entry = registry.lookup(self.spec.name)
        self.runtime = entry.factory()
        options = entry.options_model.model_validate(self.spec.options)
        why = self.runtime.unavailable_reason(options) or self.runtime.pending_reason(options)
        if why:
            raise StageError(f"prune.ratio auto times candidates on the first target, '{self.spec.name}', which "
                             f"cannot run here: {why}; list a target this machine runs first")
        self.options = (options.model_copy(update={"precision": "int8"})
                        if getattr(options, "precision", None) in ("auto", "fp32") else options)
        self.threads = self.spec.threads or usable_cores()
        self.original = judged_output(original, ds.val, recipe)
        self.contract = contract_for(recipe, self.spec, ds.val.labels, self.original)
        # data.unlabelled's held-out groups, which no stage learns from: a candidate's fp32 student must hold there
        # too; checked before any candidate: a budget that one flip there decides is bad input
        self.held = None if ds.held_out is None else judged_output(original, ds.held_out, recipe)
        if self.held is not None:
            check_held_out_resolvable(self.contract, self.held, self.spec.name)
        self.calibration = ds.calibration(recipe.data, self.spec.calibration.samples)
        self.feeds = measure_feeds(ds.val, recipe, self.spec.measure.batch)
        self.tmp = Path(tempfile.mkdtemp(prefix=".search-", dir=ctx.work))
        self.count = 0
        self.base, _ = self._open(original)

    def _open(self, model: nn.Module):
        """(open session, verdict on val) of `model` built as the target builds its int8 artifact."""
        recipe, ds = self.ctx.recipe, self.ctx.dataset
        self.count += 1
        folder = self.tmp / f"c{self.count}"
        (folder / "t").mkdir(parents=True)
        onnx = folder / "model.fp32.onnx"
        export(model, recipe.inputs, recipe.outputs, recipe.stages.export, onnx)
        bctx = BuildContext(recipe, self.spec, self.options, onnx, self.calibration, ds.val, folder / "t",
                            self.threads, load_model=lambda: model, contract=self.contract, train=ds.train)
        built = self.runtime.build(bctx)
        sess = self.runtime.open(folder / "t" / built.model_file, threads=self.threads, runtime=built.runtime)
        out = run_outputs(sess, ds.val, recipe.inputs)[self.contract.output_index]
        verdict = self.contract.judge(self.original, out, ds.val.labels)
        return sess, (verdict, built)

    def price(self, model: nn.Module, check_fp32: bool = True) -> dict[str, Any]:
        ds = self.ctx.dataset
        fp32 = self.contract.judge(self.original, judged_output(model, ds.val, self.ctx.recipe),
                                   ds.val.labels) if check_fp32 else None
        if fp32 is not None and not fp32.within:
            # int8 cannot win back what the fp32 student lost: no int8 build (accuracy control and QAT would
            # spend minutes keeping layers float for a budget already missed), no timing
            return {"within": False, "value": round(float(fp32.value), 6), "line": fp32.line(),
                    "summary": f"fp32 student {verdict_summary(fp32)}", "fp32_over": True}
        held = self._held_out(model) if check_fp32 else {}
        if held.get("held_out_over"):  # the build would reject this student: it does not generalize
            return {"within": False, "value": round(float(fp32.value), 6), "line": fp32.line(), **held,
                    "summary": f"fp32 student {verdict_summary(fp32)}; {held['held_out_summary']}"}
        sess, (verdict, built) = self._open(model)
        try:
            base_ms = float(np.median(time_block(lambda: self.base.run(self.feeds), 5)))
            per_round = max(PER_ROUND, int(np.ceil(BLOCK_MS / max(base_ms, 1e-3))))
            ratio, ci, p50, base_p50 = interleaved_ratio(lambda: sess.run(self.feeds), lambda: self.base.run(self.feeds),
                                                         rounds=ROUNDS, per_round=per_round)
        finally:
            sess.close()
            shutil.rmtree(self.tmp / f"c{self.count}", ignore_errors=True)
        return {"within": bool(verdict.within), "value": round(float(verdict.value), 6), "line": verdict.line(),
                "summary": verdict_summary(verdict),
                "speedup": round(1 / ratio, 4), "speedup_ci95": [round(1 / ci[1], 4), round(1 / ci[0], 4)],
                "p50_ms": round(p50, 4), "base_p50_ms": round(base_p50, 4), "precision": built.precision,
                **_int8_form(built.quantization), **held}

    def _held_out(self, model: nn.Module) -> dict[str, Any]:
        """The fp32 student against the original on data.unlabelled's held-out groups ({} without them)."""
        if self.held is None:
            return {}
        v = held_out_contract(self.contract).judge(
            self.held, judged_output(model, self.ctx.dataset.held_out, self.ctx.recipe), None)
        return {"held_out_value": round(float(v.value), 6), "held_out_over": not v.within,
                "held_out_summary": f"held-out groups {verdict_summary(v)} ({v.samples} inputs)"}

    def close(self) -> None:
        self.base.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

