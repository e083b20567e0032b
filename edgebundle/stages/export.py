"""Stage `export`: torch -> ONNX (edgebundle.exporters.onnx), checked against PyTorch output by output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgebundle.core.artifact import Artifact
from edgebundle.core.recipe import Recipe
from edgebundle.exporters.onnx import EXPORTER, check_parity, export, resolve_exporter, torchscript_opset
from edgebundle.stages.registry import register_stage
from edgebundle.stages.base import StageBase, StageContext, dump
from edgebundle.stages.training import accuracy, predict

FILE = "model.fp32.onnx"


@register_stage
class Export(StageBase):
    name = "export"
    label = "export (ONNX + parity)"
    after = ("teacher", "prune", "distill", "cluster")
    role = "onnx"
    collective = False
    makes_model = False  # its artifact is in the lineage, but the student stays the PyTorch model

    def enabled(self, recipe: Recipe) -> bool:
        return True

    def config(self, ctx: StageContext) -> dict[str, Any]:
        r = ctx.recipe
        d = dump(r.stages.export)
        if d.get("exporter") == "auto":  # the key before `exporter` existed, where auto means dynamo
            d.pop("exporter")
            if resolve_exporter(ctx.load(ctx.student), r.stages.export) != "dynamo":
                d["exporter_resolved"] = f"torchscript-opset{torchscript_opset(r.stages.export)}"
        return {"export": d, "inputs": [dump(i) for i in r.inputs], "outputs": r.outputs}

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return [ctx.student]

    def extra(self, ctx: StageContext) -> str:
        return ctx.dataset.fingerprint

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        recipe, ds, st = ctx.recipe, ctx.dataset, ctx.recipe.stages
        model = ctx.load(ctx.student)
        path = folder / FILE
        which = export(model, recipe.inputs, recipe.outputs, st.export, path)
        parity = check_parity(model, path, ds.test, recipe.inputs, recipe.outputs, st.export)
        metrics: dict[str, Any] = {"exporter": EXPORTER if which == "dynamo" else "torch.onnx.export(dynamo=False)",
                                   "opset": st.export.opset if which == "dynamo" else torchscript_opset(st.export),
                                   "parity": [p.__dict__ for p in parity]}
        if ds.test.labels is not None:
            metrics["student_test_accuracy"] = accuracy(predict(model, ds.test, ctx.names), ds.test.labels)
        return metrics
