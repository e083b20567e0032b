"""ExecuTorch target for phones: a `.pte` program lowered to the XNNPACK backend, int8 via PT2E.

The pruned, distilled PyTorch student is captured with `torch.export`, quantized with PT2E and the
XNNPACK quantizer (symmetric int8, per-channel weights; ReLU6 observed after its clamp) calibrated on the
recipe's calibration split (dynamic activations for token-id models where static misses the budget;
quantization-aware distillation, `options.qat`, where post-training int8 misses it: edgebundle.calibration.qat),
lowered with `to_edge_transform_and_lower` and the XNNPACK partitioner, and serialized to `model.pte`
(plus `model.fp32.pte`, lowered the same way without quantization, for comparison).

Ops XNNPACK does not take run on ExecuTorch's portable kernels, which are slow on a phone: the manifest
records how many graph nodes and what share of the multiply-accumulates were delegated, and the build
fails below `min_delegated_compute` (share of MACs, default 0.95) or `min_delegated_fraction` (share of
nodes, default 0.75). Both: a BERT leaves its mask arithmetic, embedding lookups and LayerNorms to
portable kernels (81 % of the nodes delegated, 100 % of the MACs) and still runs 2x faster than its own
fp32 program, while one big undelegated convolution would be slow whatever the node count says. The program is exported at batch 1 (what a phone runs); the session feeds a
larger batch one sample at a time. Latency measured here is an x86 XNNPACK figure, not a phone figure.

Optional extra: `pip install edgebundle[mobile]` (the `executorch` package), imported lazily.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgebundle.core.session import SessionBase
from edgebundle.core.errors import StageError, TargetUnavailable
from edgebundle.targets.base import BuildContext, Built, TargetBase, Work
from edgebundle.targets.registry import Capabilities, register_target
from edgebundle.calibration.pt2e import xnnpack_quantizer
from edgebundle.calibration.qat import QatOptions

BOOKKEEPING = ("getitem",)
HOST_NOTE = ("latency measured with executorch.runtime (XNNPACK) on this x86 host, not on a phone; measure the "
             "same .pte on the device: `edgebundle measure BUNDLE --device adb://SERIAL --runner executor_runner`")


class ExecutorchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN/inf (recipe rule)

    precision: Literal["auto", "int8", "fp32"] = "auto"  # auto: int8 unless fp32 is faster here (the runner measures both)
    min_delegated_fraction: float = Field(0.75, ge=0, le=1, description="fail below this share of graph nodes "
                                          "delegated to XNNPACK")
    min_delegated_compute: float = Field(0.95, ge=0, le=1, description="fail below this share of the program's "
                                         "multiply-accumulates (linear, matmul, convolution) delegated to XNNPACK")
    also_fp32: bool = Field(True, description="also write model.fp32.pte, for the same-runtime comparison")
    activations: Literal["auto", "static", "dynamic"] = Field("auto", description=(
        "int8 activations: static (calibrated scales) or dynamic (per inference, Linear layers only); auto: "
        "static, and for models fed token ids dynamic when static misses the budget on validation inputs "
        "(static int8 of a real BERT collapses)"))
    qat: QatOptions = QatOptions()


def _missing() -> str | None:
    if importlib.util.find_spec("executorch") is None:
        return "the executorch package is not installed (pip install edgebundle[mobile])"
    return None


def _node_macs(node) -> int:
    """Multiply-accumulates of one linear / matmul / convolution node of an edge graph, from its shapes."""
    name = str(getattr(node.target, "_op", node.target))
    val = node.meta.get("val")
    shapes = [a.meta["val"].shape if hasattr(a, "meta") and hasattr(a.meta.get("val"), "shape") else None
              for a in node.args]
    if val is None or not hasattr(val, "numel"):
        return 0
    if "convolution" in name and len(shapes) > 1 and shapes[1] is not None:
        return int(val.numel()) * math.prod(int(d) for d in shapes[1][1:])
    if any(op in name for op in ("linear", "aten.mm", "addmm", "bmm", "matmul")):
        a = shapes[1] if "addmm" in name else shapes[0]
        return int(val.numel()) * int(a[-1]) if a is not None and len(a) else 0
    return 0


def _lower(exported, out: Path) -> dict[str, Any]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    from edgebundle.core.modelio import macs

    total_macs = macs(exported.module(), exported.example_inputs[0] if exported.example_inputs else ())
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    graph = edge.exported_program().graph_module
    info = get_delegation_info(graph)
    left_macs = sum(_node_macs(n) for n in graph.graph.nodes if n.op == "call_function")
    # `getitem` only unpacks the delegate's output tuple: bookkeeping, not an op the phone computes
    compute = [v for v in info.delegation_by_operator.values() if v.op_type not in BOOKKEEPING]
    delegated = sum(v.delegated for v in compute)
    non_delegated = sum(v.non_delegated for v in compute)
    total = delegated + non_delegated
    left = sorted(f"{v.op_type} x{v.non_delegated}" for v in compute if v.non_delegated)
    out.write_bytes(edge.to_executorch().buffer)
    return {"delegated_nodes": delegated, "non_delegated_nodes": non_delegated,
            "delegated_subgraphs": int(info.num_delegated_subgraphs),
            "delegated_fraction": delegated / total if total else 1.0, "non_delegated_ops": left,
            "macs": total_macs, "non_delegated_macs": left_macs,
            "delegated_compute": 1.0 - min(left_macs, total_macs) / total_macs if total_macs else 1.0}


def _ptq(ctx: BuildContext, fp32_ep, example, names: list[str], *, dynamic: bool) -> dict[str, Any]:
    """Post-training int8 of the captured program (XNNPACK quantizer, calibrated sample by sample at batch 1),
    lowered to model.pte; returns its delegation record."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xnnpack_quantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    prepared = prepare_pt2e(fp32_ep.module(), quantizer)
    with torch.no_grad():
        for i in range(len(ctx.calibration)):
            prepared(*(torch.from_numpy(np.ascontiguousarray(ctx.calibration.inputs[k][i:i + 1])) for k in names))
    return _lower(torch.export.export(convert_pt2e(prepared), example), ctx.workdir / "model.pte")


def _judge_on_val(ctx: BuildContext, pte: Path, names: list[str]):
    """The .pte's verdict on (up to 64 of) the validation inputs against the fp32 ONNX model."""
    from edgebundle.targets.common import judge_on_val

    return judge_on_val(ctx, ExecutorchSession(pte, names))


def _qat(ctx: BuildContext, model, q: QatOptions, example) -> tuple[dict[str, Any], dict[str, Any]]:
    """Static int8 by quantization-aware distillation from the fp32 student; lowered to model.pte."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    from edgebundle.calibration.qat import fake_quant_config
    from edgebundle.targets.common import qat_program

    quantizer = xnnpack_quantizer().set_global(fake_quant_config(get_symmetric_quantization_config(is_per_channel=True)))
    r, record = qat_program(ctx, model, q, quantizer, "PT2E QAT (torchao prepare_qat_pt2e/convert_pt2e), XNNPACK "
                            "quantizer's PTQ observers as frozen fake quantizers")
    return _lower(torch.export.export(r.model, example), ctx.workdir / "model.pte"), record


@register_target("executorch", capabilities=Capabilities(precisions=("int8", "fp32"), extra="mobile",
                                                          runtime="executorch"),
                 options=ExecutorchOptions)
class ExecutorchTarget(TargetBase):
    def unavailable_reason(self, options: ExecutorchOptions | None = None) -> str | None:
        return _missing()

    def pending_reason(self, options: ExecutorchOptions | None = None) -> str | None:
        return None  # builds and times its own artifact on this machine

    def start(self, ctx: BuildContext, opt: ExecutorchOptions) -> Work:
        """The PyTorch student captured with torch.export at batch 1; the fp32 program lowered when shipped or
        asked for beside the int8 one."""
        import torch

        if ctx.load_model is None:
            raise StageError("the executorch target starts from the PyTorch student; none was given")
        names = [s.name for s in ctx.recipe.inputs]
        model = ctx.load_model().cpu().eval()
        example = tuple(torch.from_numpy(np.ascontiguousarray(ctx.calibration.inputs[n][:1])) for n in names)
        try:
            fp32_ep = torch.export.export(model, example)
        except Exception as e:  # torch.export raises many types (Unsupported, UserError, ...)
            raise StageError(f"torch.export cannot capture the student: {type(e).__name__}: {str(e)[:300]}") from e
        work = Work(opt, {"backend": "XNNPACK", "batch": 1, "inputs": names, "threads_note": "XNNPACK threadpool"},
                    {"model": model, "names": names, "example": example, "fp32_ep": fp32_ep, "files": [],
                     "fp32_info": None})
        if opt.precision == "fp32" or opt.also_fp32:
            name = "model.pte" if opt.precision == "fp32" else "model.fp32.pte"
            work.state["fp32_info"] = _lower(fp32_ep, ctx.workdir / name)
            work.state["files"].append(name)
        return work

    def fp32(self, ctx: BuildContext, work: Work) -> Built:
        return self._delegated(ctx, work, work.state["fp32_info"], {})

    def int8(self, ctx: BuildContext, work: Work) -> Built:
        """PT2E int8: static (and dynamic for token-id models) judged on val in turn; QAT when asked or when
        post-training int8 missed the budget."""
        from edgebundle.targets.common import pt2e_plan

        opt, names, example = work.opt, work.state["names"], work.state["example"]
        order, qat = pt2e_plan(ctx, opt.activations, opt.qat.enabled, ["static", "dynamic"])
        tried: list[dict[str, Any]] = []
        mode, within, info = "static", False, work.state["fp32_info"]
        for mode in order:
            info = _ptq(ctx, work.state["fp32_ep"], example, names, dynamic=mode == "dynamic")
            if len(order) == 1 and qat == "off":
                break
            v = _judge_on_val(ctx, ctx.workdir / "model.pte", names)
            within = v.within or v.judged_nothing  # nothing judged on val: the test split decides
            tried.append({"activations": mode, "val_value": round(float(v.value), 6), "within_budget": v.within,
                          "delegated_fraction": round(info["delegated_fraction"], 4)})
            if within:
                break
        qat_record = None
        if qat == "on" or (qat == "auto" and not within):
            mode = "static"
            info, qat_record = _qat(ctx, work.state["model"], opt.qat, example)
            v = _judge_on_val(ctx, ctx.workdir / "model.pte", names)
            tried.append({"activations": "static", "qat": True, "val_value": round(float(v.value), 6),
                          "within_budget": v.within, "delegated_fraction": round(info["delegated_fraction"], 4)})
        work.state["files"].insert(0, "model.pte")
        quant = {"tool": "PT2E (torchao prepare_pt2e/convert_pt2e) + XNNPACKQuantizer (ReLU6 observed after "
                         "the clamp)",
                 "scheme": "int8 symmetric, per-channel weights, " + (
                     "dynamic activations (Linear layers)" if mode == "dynamic" else "static activations"),
                 "calibration": {"method": "histogram (observers)", "samples": len(ctx.calibration)},
                 **({"activations_tried_on_val": tried} if tried else {}),
                 **({"qat": qat_record} if qat_record else {})}
        if work.state["fp32_info"] is not None:
            work.runtime["delegation_fp32"] = work.state["fp32_info"]
        return self._delegated(ctx, work, info, quant)

    @staticmethod
    def _delegated(ctx: BuildContext, work: Work, info: dict[str, Any], quant: dict[str, Any]) -> Built:
        """The Built record, once XNNPACK took enough of the program (else a StageError naming what it left)."""
        opt, files = work.opt, work.state["files"]
        work.runtime["delegation"] = info
        left = ", ".join(info["non_delegated_ops"]) or "n/a"
        if info["delegated_fraction"] < opt.min_delegated_fraction:
            raise StageError(f"XNNPACK took only {info['delegated_fraction']:.0%} of the graph's nodes "
                             f"(below min_delegated_fraction {opt.min_delegated_fraction:.0%}); left to the slow "
                             f"portable kernels: {left}")
        if info["delegated_compute"] < opt.min_delegated_compute:
            raise StageError(f"XNNPACK took only {info['delegated_compute']:.0%} of the program's multiply-"
                             f"accumulates (below min_delegated_compute {opt.min_delegated_compute:.0%}); left to "
                             f"the slow portable kernels: {left}")
        notes = [HOST_NOTE]
        method = ctx.spec.calibration.method
        if opt.precision == "int8" and method != "minmax":
            notes.append(f"calibration.method '{method}' is not offered by the XNNPACK quantizer's observers; "
                         "its own (histogram) observers were used")
        return Built("model.pte", tuple(files), opt.precision, quant, work.runtime,
                     notes=tuple(notes), fp32_file="model.fp32.pte" if "model.fp32.pte" in files else None)

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]) -> "ExecutorchSession":
        return ExecutorchSession(model_path, runtime.get("inputs", []))


class ExecutorchSession(SessionBase):
    def __init__(self, model_path: Path, input_names: list[str]) -> None:
        why = _missing()
        if why:
            raise TargetUnavailable(why)
        from executorch.runtime import Runtime

        try:
            self.method = Runtime.get().load_program(str(model_path)).load_method("forward")
        except Exception as e:  # the runtime raises RuntimeError/ValueError for corrupt programs
            raise StageError(f"executorch cannot load {model_path.name}: {e}") from e
        self.input_names = input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        names = self.input_names or list(feeds)
        n = len(feeds[names[0]])
        outs = []
        for i in range(n):  # batch-1 program
            res = self.method.execute([torch.from_numpy(np.ascontiguousarray(feeds[k][i:i + 1])) for k in names])
            outs.append([r.numpy() if hasattr(r, "numpy") else np.asarray(r) for r in res])
        return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]

    def close(self) -> None:
        self.method = None
