"""Accuracy control for Q/DQ ONNX models: per-layer sensitivity and the fewest layers kept in float.

Sensitivity comes from ONNX Runtime's own quantization debugger (`onnxruntime.quantization.
qdq_loss_debug`): the fp32 and the int8 model are run on the same validation samples with every
intermediate tensor saved, and each weighted layer (Conv, Gemm, MatMul) gets the signal-to-quantization-
noise ratio (SQNR, dB) of its dequantized weight against the float weight, and of its input activation
after its own quantize/dequantize against before (the noise that layer adds by itself; the accumulated
error vs fp32 is recorded too but not ranked on, since it grows towards the output whatever the cause).
The lowest SQNR is the most damaged layer. When int8 exceeds the accuracy budget, the target
re-quantizes with the 1, 2, 3, ... (beyond 8: doubling) most sensitive layers excluded, until it holds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgebundle.calibration.readers import SplitReader
from edgebundle.core.metrics import Contract, Verdict
from edgebundle.core.data import Split
from edgebundle.core.recipe import InputSpec

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_sensitivity(fp32: Path, int8: Path, split: Split, specs: list[InputSpec], samples: int = 8
                      ) -> list[dict[str, Any]]:
    """Per weighted layer of `fp32` (node names as in that model): weight and input SQNR, most damaged first."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_activation_error, compute_signal_to_quantization_noice_ratio,
        create_activation_matching, create_weight_matching, modify_model_output_intermediate_tensors,
    )

    part = split.head(samples)
    with tempfile.TemporaryDirectory() as td:
        aug_f, aug_q = Path(td) / "f.onnx", Path(td) / "q.onnx"
        modify_model_output_intermediate_tensors(str(fp32), str(aug_f))
        modify_model_output_intermediate_tensors(str(int8), str(aug_q))
        fa = collect_activations(str(aug_f), SplitReader(part, specs))
        qa = collect_activations(str(aug_q), SplitReader(part, specs))
    act = compute_activation_error(create_activation_matching(qa, fa))
    wts = {}
    for name, match in create_weight_matching(str(fp32), str(int8)).items():  # scalars too (e.g. a Mul's constant)
        wts[name] = compute_signal_to_quantization_noice_ratio(np.atleast_1d(match["float"]),
                                                               np.atleast_1d(match["dequantized"]))
    rows = []
    for n in onnx.load(str(fp32), load_external_data=False).graph.node:
        if n.op_type not in WEIGHTED:
            continue
        w = wts.get(n.input[1]) if len(n.input) > 1 else None
        a = act.get(n.input[0], {})
        local = a.get("qdq_err")  # the noise quantizing this layer's input adds by itself
        vals = [v for v in (w, local) if v is not None and np.isfinite(v)]
        rows.append({"node": n.name, **({"module": m} if (m := torch_module(n)) else {}), "op": n.op_type,
                     "weight_sqnr_db": _r(w), "input_sqnr_db": _r(local),
                     "input_vs_fp32_sqnr_db": _r(a.get("xmodel_err")),  # accumulated from all layers before
                     "sensitivity_db": _r(min(vals)) if vals else None})
    rows.sort(key=lambda r: (r["sensitivity_db"] is None, r["sensitivity_db"] if r["sensitivity_db"] is not None else 0))
    return rows


def output_nodes(model: Path) -> list[str]:
    """The nodes of an ONNX model that write its graph outputs (a head's Concat of boxes and scores, a Gemm)."""
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    outs = {o.name for o in g.output}
    return [n.name for n in g.node if n.name and outs & set(n.output)]


def torch_module(node) -> str | None:
    """The PyTorch module an ONNX node came from (`features.0`), from the metadata torch.onnx's dynamo exporter
    writes on each node (`pkg.torch.onnx.name_scopes`: the module path, then the op); None without it. A conv
    with its batch norm folded in carries the norm's scope: named by the block holding both."""
    import ast

    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2 or not all(isinstance(x, str) for x in scopes):
        return None
    modules = [x for x in scopes[:-1] if x]  # the last scope is the op itself; the first the model ('')
    if not modules:
        return None
    folded = (node.op_type == "Conv" and len(classes) == len(scopes) and len(modules) > 1
              and "BatchNorm" in str(classes[-2]))
    return modules[-2] if folded else modules[-1]


def _r(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 2)


def budget_record(v: Verdict) -> dict[str, Any]:
    """The manifest's `accuracy_budget` for a model as quantized, before any layer is kept in float.
    `drop_*` is the verdict's loss: points below fp32 (top1, agreement, functions), 1 - min cosine,
    minus the SNR in dB, or the MSE. On a slice that judges nothing, `not_steered` says why nothing steers."""
    return {"metric": v.metric, "split": "val", "budget": v.budget,
            "max_drop": v.max_drop, "value_full_int8": _r6(v.value),
            "drop_full_int8": _r6(v.loss), "attempts": [], "excluded_nodes": [], "value_reached": _r6(v.value),
            "drop_reached": _r6(v.loss), "within_budget": v.within, "judged_samples": v.samples,
            **({"not_steered": not_steered(v)} if v.judged_nothing else {})}


def not_steered(v: Verdict) -> str:
    """Why nothing was kept float on a validation slice that judges nothing (manifest text)."""
    return (f"the validation inputs judge nothing ({v.line()}): no layer kept float for a loss that cannot be "
            "seen there; the test split decides")


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`points` (each with `p50_ms` and `val_loss`, the verdict's loss: lower is closer) marked `pareto`: no
    other point is both at least as fast and at least as close, and strictly better in one."""
    def beats(a, b) -> bool:
        return (a["p50_ms"] <= b["p50_ms"] and a["val_loss"] <= b["val_loss"]
                and (a["p50_ms"] < b["p50_ms"] or a["val_loss"] < b["val_loss"]))

    timed = [p for p in points if p.get("p50_ms") is not None and p.get("val_loss") is not None]
    return [{**p, "pareto": any(p is t for t in timed) and not any(beats(q, p) for q in timed if q is not p)}
            for p in points]


def layers_kept_float(quantization: dict[str, Any]) -> list[str]:
    """The nodes a quantization record's accuracy control kept in float (its `accuracy_budget.excluded_nodes`;
    none where no control ran)."""
    return list((quantization.get("accuracy_budget") or {}).get("excluded_nodes") or [])


def _r6(x: float) -> float:
    return round(float(x), 6) if np.isfinite(x) else float(x)


def keep_float_until_within(ranked: list[str], quantize: Callable[[list[str]], None], judge: Callable[[], Verdict],
                            first: Verdict, info: dict[str, Any], price: Callable[[], float] | None = None) -> Verdict:
    """Re-quantize with the 1, 2, 3, ... (beyond 8: doubling) first nodes of `ranked` (most damaging first)
    kept in float, `judge()` after each, until the budget holds or all are float. Records the attempts and
    the outcome in `info` (a `budget_record`); `first` is the verdict with nothing kept float; `price()`, when
    given, times each attempt's model (its p50 in ms)."""
    k, exclude, v = 1, [], first
    while ranked:
        exclude = ranked[:k]
        quantize(exclude)
        v = judge()
        info["attempts"].append({"excluded": len(exclude), "drop": _r6(v.loss), "value": _r6(v.value),
                                 "within_budget": v.within, **({"p50_ms": _r6(price())} if price else {})})
        if v.within or k >= len(ranked):
            break
        k = min(k + 1 if k < 8 else 2 * k, len(ranked))
    info.update(excluded_nodes=exclude, drop_reached=_r6(v.loss), value_reached=_r6(v.value), within_budget=v.within)
    return v


def control_accuracy(pre: Path, out: Path, quantize: Callable[[list[str]], None], *, split: Split,
                     specs: list[InputSpec], contract: Contract, outputs: Callable[[Path], np.ndarray],
                     p50_ms: Callable[[Path], float] | None, layer_errors: bool = True,
                     control: bool = True) -> dict[str, Any]:
    """The per-layer error table of the Q/DQ model `out` (quantized from `pre`) and, over the contract's
    budget on `split`, re-quantization by `quantize(excluded_nodes)` (which rewrites `out`) with the 1, 2,
    3, ... (beyond 8: doubling) most sensitive layers kept in float until the budget holds. `outputs(model)`
    runs a model over `split` (the judged output); `p50_ms(model)`, when given, prices the float layers."""
    result: dict[str, Any] = {}
    table: list[dict[str, Any]] = []
    if layer_errors or control:
        try:
            table = layer_sensitivity(pre, out, split, specs)
        except (RuntimeError, ValueError, TypeError, KeyError) as e:  # onnxruntime's debugger, best effort
            result["layer_errors_failed"] = f"{type(e).__name__}: {e}"
    if layer_errors:
        result["layer_errors"] = table
    ref = outputs(pre)  # the fp32 outputs, once for every attempt
    v = contract.judge(ref, outputs(out), split.labels)
    info = budget_record(v)
    result["accuracy_budget"] = info
    if v.within or not control or v.judged_nothing:
        return result
    full_ms = p50_ms(out) if p50_ms else None
    if full_ms is not None:
        info["p50_full_int8_ms"] = _r6(full_ms)
    ranked = [r["node"] for r in table if r["sensitivity_db"] is not None]
    if v.details.get("features_lost"):  # a part of an output lost under the rest (one scale for a mixed tensor):
        ranked = [n for n in output_nodes(pre) if n not in ranked] + ranked  # first keep the output's node float
    keep_float_until_within(ranked, quantize, lambda: contract.judge(ref, outputs(out), split.labels), v, info,
                            price=(lambda: p50_ms(out)) if p50_ms else None)
    if p50_ms:
        kept_ms = info["attempts"][-1]["p50_ms"] if info["attempts"] else full_ms  # the last attempt's, timed
        info["latency_cost"] = {"p50_full_int8_ms": full_ms, "p50_with_float_layers_ms": kept_ms,
                                "ratio": kept_ms / full_ms}
    return result
