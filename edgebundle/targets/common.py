"""What the targets share: ONNX Runtime calibration options, the fp32/int8
judged outputs and batch-1 latency of an ONNX model on the validation split, and the quantization-aware
distillation call. A target depends on its protocol (targets.base) and this module, never on another target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgebundle.calibration.qat import QatOptions
from edgebundle.calibration.readers import iter_feeds, run_split
from edgebundle.core.errors import StageError
from edgebundle.core.session import OrtSession
from edgebundle.targets.base import BuildContext


def calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


CALIB_CHUNK = 16  # calibration folds its statistics every <= 16 feeds instead of holding every activation


def calib_stride(feeds: int) -> int:
    """The largest divisor of `feeds` up to CALIB_CHUNK (ORT requires the stride to divide the count)."""
    return max(d for d in range(1, min(CALIB_CHUNK, feeds) + 1) if feeds % d == 0)


def calibration_extra_options(cal, feeds: int) -> dict[str, Any]:
    """quantize_static extra_options: calibration in strides (`CalibStridedMinMax`: ORT merges min/max ranges
    or histograms after each stride, so memory stays bounded as samples grow; bench/calib_memory.py).
    Not `CalibMaxIntermediateOutputs`: in this onnxruntime it drops each full chunk without using it."""
    opts: dict[str, Any] = {"CalibStridedMinMax": calib_stride(feeds)} if feeds > 0 else {}
    if cal.method == "percentile":
        opts["CalibPercentile"] = cal.percentile
    return opts


def qat_program(ctx: BuildContext, model, q: QatOptions, quantizer, tool: str,
                val_reference: np.ndarray | None = None, fold_quantize: bool = True) -> tuple[Any, dict[str, Any]]:
    """Quantization-aware distillation (calibration.qat) of the PyTorch student `model` under `quantizer`,
    epochs picked on `q.val_samples` validation inputs by the target's contract: (QatResult, manifest record).
    `val_reference`: the fp32 outputs on the validation split, when the caller has them (else computed)."""
    from edgebundle.calibration.qat import qat_pt2e
    from edgebundle.core.distillation import loss_for_metric

    contract = ctx.val_contract()
    part = ctx.val_head(q.val_samples)
    ref = val_outputs(ctx.fp32_onnx, part) if val_reference is None else val_reference[:len(part.validation)]
    train = ctx.train.head(q.samples)
    loss = loss_for_metric(contract.metric)
    r = qat_pt2e(model, quantizer, train, ctx.calibration, part.validation, ctx.recipe.inputs, val_reference=ref,
                 score=lambda out: -part.judge(ref, out).loss, output=contract.output_index, loss=loss,
                 epochs=q.epochs, lr=q.lr, batch_size=q.batch_size, temperature=q.temperature, seed=ctx.recipe.seed,
                 patience=q.patience, fold_quantize=fold_quantize)
    record = {"tool": tool, "loss": loss, "teacher": "the fp32 student",
              "train_samples": len(train), "val_samples": len(part.validation), "epochs": q.epochs,
              **({"patience": q.patience} if q.patience is not None else {}), "epochs_run": r.epochs_run, "lr": q.lr,
              "batch_size": q.batch_size, "best_epoch": r.best_epoch,
              "val_loss_by_epoch": [round(-h, 6) for h in r.history],
              "val_distill_loss_by_epoch": [round(x, 6) for x in r.distill_loss], "seconds": round(r.seconds, 1)}
    return r, record


def val_outputs(model: Path, ctx: BuildContext, level: str = "all") -> np.ndarray:
    """The model's judged output on the validation split (ONNX Runtime CPU, graph optimisation `level`)."""
    with OrtSession(model, threads=ctx.threads, level=level) as sess:
        return run_split(sess, ctx.validation, ctx.recipe.inputs, output=ctx.val_contract().output_index)


def pt2e_plan(ctx: BuildContext, activations: str, qat_enabled: str, for_tokens: list[str]) -> tuple[list[str], str]:
    """A PT2E target's int8 plan: the post-training forms to try in turn (`activations`, or under auto static,
    and `for_tokens` for models fed token ids) and the QAT switch (on | auto | off). QAT on replaces
    post-training int8; it fine-tunes the static program, so dynamic activations turn it off; without training
    inputs it cannot run (on: a StageError)."""
    tokens = any(s.dtype in ("int64", "int32") for s in ctx.recipe.inputs)
    order = [activations] if activations != "auto" else (list(for_tokens) if tokens else ["static"])
    qat = qat_enabled if ctx.train is not None and len(ctx.train) >= 2 else "off"
    if qat_enabled == "on" and qat == "off":
        raise StageError("qat enabled 'on' needs training inputs and this build has none (a build from a "
                         "work folder trains on its calibration inputs: set data.calibration_split train)")
    if qat == "on":
        order = []  # QAT instead of post-training int8
    elif activations == "dynamic":
        qat = "off"  # QAT fine-tunes the static program
    return order, qat


def judge_on_val(ctx: BuildContext, session) -> Any:
    """A target's own session's verdict on (up to 64 of) the validation inputs against the fp32 ONNX model:
    how a target picks between its int8 forms without touching the test split. Closes the session."""
    from edgebundle.core.data import run_outputs

    part = ctx.val_head(64)
    with session as sess:
        out = run_outputs(sess, part.validation, ctx.recipe.inputs)[ctx.val_contract().output_index]
    return part.judge(val_outputs(ctx.fp32_onnx, part), out)


def p50_ms(model: Path, ctx: BuildContext) -> float:
    """Batch-1 median latency, the price of the layers accuracy control keeps in float."""
    from edgebundle.core.measure import measure
    from edgebundle.core.recipe import MeasureSpec

    feeds = next(iter_feeds(ctx.validation.head(1), ctx.recipe.inputs, 1))
    with OrtSession(model, threads=ctx.threads) as sess:
        return measure(lambda: sess.run(feeds), MeasureSpec(iterations=50, warmup_max=200), threads=ctx.threads).p50_ms
