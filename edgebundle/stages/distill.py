"""Stage `distill`: the pruned student learns from the original teacher: KL on softened logits (+ CE on
labels where there are some) for class outputs, cosine for embeddings, relative MSE otherwise (the loss
follows the recipe's metric unless `distill.loss` says), hidden states where asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgebundle.core.artifact import Artifact
from edgebundle.core.modelio import save_structured
from edgebundle.core.recipe import Recipe
from edgebundle.stages.registry import register_stage
from edgebundle.stages.base import StageBase, StageContext, without_defaults
from edgebundle.stages.padding import batches_key
from edgebundle.stages.pruning import count
from edgebundle.core.metrics import per_sample_cosine, resolve_name
from edgebundle.stages.training import accuracy, agreement, distill, distill_loss_for, dropout_off, predict


HELD_OUT_FILE = "held_out.npz"  # the student's and the original's outputs on data.unlabelled's held-out groups


@register_stage
class Distill(StageBase):
    name = "distill"
    label = "distill (from the teacher)"
    after = ("prune",)
    compresses = "distillation"
    collective = True  # trains with DDP under torchrun
    makes_model = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.stages.distill.enabled

    def one_output(self, recipe: Recipe) -> bool:
        return self.enabled(recipe)

    def config(self, ctx: StageContext) -> dict[str, Any]:
        d = without_defaults(ctx.recipe.stages.distill, "patience", "augment", "dropout", "group_by_length")
        metric = judged_metric(ctx)  # once: it runs the teacher when the recipe's metric is auto
        if d.get("loss") == "auto":  # the key before `loss` existed: those work folders stay valid
            d.pop("loss")
            kind = distill_loss_for(ctx.recipe.stages.distill, metric)
            if kind != "kl":
                d["loss_resolved"] = kind
        confident = judged_confidence(ctx, metric)
        return {"distill": d, "seed": ctx.recipe.seed,
                **({"dropout": "off"} if dropout_off(ctx.recipe.stages.distill, ctx.pretrained) else {}),
                **({"checkpoint": f"agreement on inputs the teacher holds >= {confident:g}"}
                   if confident is not None else {}),
                **({"checkpoint": "cosine budget's margin"} if metric == "cosine" else {}),
                **batches_key(ctx.recipe.inputs, ctx.recipe.stages.distill.group_by_length)}

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return [ctx.student, ctx.artifacts["teacher"]]

    def extra(self, ctx: StageContext) -> str:
        return ctx.dataset.fingerprint

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        recipe, ds, names = ctx.recipe, ctx.dataset, ctx.names
        teacher = ctx.artifacts["teacher"]
        t_model, s_model = ctx.load(teacher), ctx.load(ctx.student)
        if ctx.student.metrics.get("unchanged"):  # the structure search kept the unpruned model: nothing to learn
            save_structured(s_model, folder)
            return {"skipped": "the student is the original model (the structure search pruned nothing)"}
        metric = judged_metric(ctx)  # once: it runs the teacher when the recipe's metric is auto
        fit = distill(s_model, t_model, ds.distill_train, ds.val, names, recipe.stages.distill, seed=recipe.seed,
                      device=ctx.device, metric=metric, specs=recipe.inputs,
                      pretrained=ctx.pretrained, budget=ctx.recipe.metric)
        s_model = s_model.cpu().eval()
        save_structured(s_model, folder)
        macs, params = count(s_model, ctx.example)
        metrics = {"best_val_accuracy" if fit.metric == "val_accuracy" else f"best_{fit.metric}":
                   fit.best_val_accuracy, "best_epoch": fit.best_epoch, "val_metric": fit.metric,
                   "val_history": fit.history, "epochs_run": fit.epochs, "macs": macs, "params": params, "device": str(ctx.device)}
        if ds.test.labels is not None:
            metrics["teacher_test_accuracy"] = teacher.metrics.get("test_accuracy")
            metrics["test_accuracy"] = accuracy(predict(s_model, ds.test, names), ds.test.labels)
        classes = metric in ("top1", "agreement")
        t_model = t_model.cpu().eval()
        metrics["student_vs_teacher"] = vs_teacher(predict(s_model, ds.test, names), predict(t_model, ds.test, names),
                                                   classes=classes)
        if ds.unlabelled is not None:
            metrics["unlabelled_inputs"] = len(ds.unlabelled)
        if ds.held_out is not None:  # data.unlabelled's groups distillation never saw: build judges them too
            s_held, t_held = predict(s_model, ds.held_out, names), predict(t_model, ds.held_out, names)
            np.savez(folder / HELD_OUT_FILE, student=s_held, original=t_held,
                     groups=np.asarray(ds.held_out.groups).astype(str))
            metrics["student_vs_teacher"]["held_out"] = {**vs_teacher(s_held, t_held, classes=classes),
                                                         "inputs": len(ds.held_out),
                                                         "groups": ds.held_out.group_count()}
        return metrics


def vs_teacher(student: np.ndarray, teacher: np.ndarray, classes: bool = True) -> dict[str, float]:
    """How far the student's outputs are from the teacher's on the test split: per-input cosine (min and
    mean) and, for class outputs, top-1 agreement in percent."""
    cos = per_sample_cosine(student, teacher)
    out = {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6)}
    if classes and student.ndim == 2 and student.shape[1] >= 2:
        out["top1_agreement"] = round(agreement(student, teacher), 4)
    return out


def judged_confidence(ctx: StageContext, metric: str) -> float | None:
    """The teacher confidence from which agreement is judged, where the recipe's metric is agreement."""
    return ctx.recipe.metric.min_confidence if metric == "agreement" else None


def judged_metric(ctx: StageContext) -> str:
    """The recipe's metric by name (auto resolved on the teacher's output: it runs the teacher once)."""
    import torch

    r = ctx.recipe
    if r.metric.name != "auto":
        return r.metric.name
    idx, name = r.judged_output
    with torch.no_grad():
        out = ctx.load(ctx.artifacts["teacher"])(*ctx.example)
    out = out[idx] if isinstance(out, (tuple, list)) else out
    return resolve_name(r.metric, has_labels=ctx.dataset.train.labels is not None, output_name=name,
                        output_shape=tuple(out.shape))
