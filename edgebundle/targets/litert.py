"""LiteRT (TensorFlow Lite) target for Android: a `.tflite` converted from the PyTorch student by
`litert-torch` (no TensorFlow), int8 by PT2E with litert-torch's quantizer, run by `ai_edge_litert`'s
interpreter with the XNNPACK delegate.

The student is captured with `torch.export` at batch 1 (what a phone runs) and converted with
`litert_torch.convert`. int8 comes in two forms:
- static: `prepare_pt2e` / `convert_pt2e(fold_quantize=False)` with
  `litert_torch.quantize.pt2e_quantizer.PT2EQuantizer` (symmetric int8, per-channel weights, calibrated on the
  recipe's calibration split sample by sample), converted with `QuantConfig(pt2e_quantizer=...)`, which makes
  a real int8 model (int8 tensors, int8 input and output with their scales; without it the converter keeps
  float ops between quantize/dequantize pairs);
- dynamic: int8 per-channel weights (embedding tables too) with activations quantized per inference, through
  litert-torch's ai-edge-quantizer recipe (`quant_recipes.full_dynamic_recipe`), what XNNPACK runs as its
  dynamically quantized fully connected kernels. PT2E's own dynamic config cannot be used: its converter
  quantizes an embedding table with a zero point that EMBEDDING_LOOKUP refuses.
`activations: auto` builds static for images and dynamic first for models fed token ids, falling back to the
other form when the first misses the budget on validation inputs. Measured on this x86 host (AVX-512 VNNI):
all-MiniLM-L6-v2 dynamic 3.3 ms vs static 13.3 ms vs LiteRT fp32 12.5 ms (static misses a cosine 0.99 budget,
dynamic holds it); EfficientNet-Lite1 dynamic 14.4 ms vs LiteRT fp32 6.1 ms. The session quantizes inputs and dequantizes outputs
with the model's own scales, so the contract judges float outputs like every target's. `model.fp32.tflite`
is written beside the int8 model for the same-runtime comparison.

Latency measured here is an x86 XNNPACK figure, not a phone figure: measure the `.tflite` on the phone with
`edgebundle measure BUNDLE --device adb://SERIAL --runner benchmark_model`.

Optional extra: `pip install edgebundle[litert]` (litert-torch, ai-edge-litert), imported lazily.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgebundle.calibration.qat import QatOptions
from edgebundle.core.errors import StageError, TargetUnavailable
from edgebundle.core.session import SessionBase
from edgebundle.targets.base import BuildContext, Built, TargetBase, Work
from edgebundle.targets.registry import Capabilities, register_target

HOST_NOTE = ("latency measured with ai_edge_litert's interpreter (XNNPACK) on this x86 host, not on a phone; measure "
             "the same .tflite on the device: `edgebundle measure BUNDLE --device adb://SERIAL --runner benchmark_model`")


class LitertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    precision: Literal["auto", "int8", "fp32"] = "auto"  # auto: int8 unless fp32 is faster here (the runner measures both)
    activations: Literal["auto", "static", "dynamic"] = Field("auto", description=(
        "int8 activations: static (calibrated scales, int8 end to end) or dynamic (int8 weights, activations "
        "quantized per inference); auto: static for images, dynamic first for models fed token ids, the other "
        "form where the first misses the budget on validation inputs"))
    per_channel: bool = Field(True, description="static int8 weights per output channel (else per tensor); the "
                              "dynamic form's weights are always per channel")
    also_fp32: bool = Field(True, description="also write model.fp32.tflite, for the same-runtime comparison")
    qat: QatOptions = QatOptions()
    min_delegated_compute: float = Field(0.95, ge=0, le=1, description="fail below this share of the model's "
                                         "multiply-accumulates (convolutions, fully connected, batch matmul) "
                                         "run by XNNPACK rather than LiteRT's own kernels")


def _missing() -> str | None:
    for module, package in (("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert")):
        if importlib.util.find_spec(module) is None:
            return f"the {package} package is not installed (pip install edgebundle[litert])"
    return None


def _convert(model, example: tuple, out: Path, quant_config=None) -> None:
    import litert_torch

    try:
        edge = litert_torch.convert(model, example, **({"quant_config": quant_config} if quant_config else {}))
        edge.export(str(out))
    except Exception as e:  # the converter raises ValueError/RuntimeError of its own with MLIR text
        raise StageError(f"litert-torch cannot convert the student: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from e


def _int8(ctx: BuildContext, model, example: tuple, names: list[str], per_channel: bool, dynamic: bool) -> str:
    """int8 model.tflite in the static or dynamic form (module docstring); returns the tool in a few words."""
    out = ctx.workdir / "model.tflite"
    if dynamic:
        from litert_torch.generative.quantize import quant_attrs, quant_recipes

        _convert(model, example, out, quant_recipes.full_dynamic_recipe(
            granularity=quant_attrs.Granularity.CHANNELWISE))
        return "ai-edge-quantizer through litert-torch (quant_recipes.full_dynamic_recipe)"
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    with torch.no_grad():
        for i in range(len(ctx.calibration)):
            prepared(*(torch.from_numpy(np.ascontiguousarray(ctx.calibration.inputs[k][i:i + 1])) for k in names))
    _convert(convert_pt2e(prepared, fold_quantize=False), example, out, QuantConfig(pt2e_quantizer=quantizer))
    return ("PT2E (torchao prepare_pt2e/convert_pt2e) + litert-torch PT2EQuantizer, converted with "
            "QuantConfig(pt2e_quantizer)")


MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "CONV_3D", "TRANSPOSE_CONV")


def delegation(path: Path) -> dict[str, Any]:
    """What XNNPACK took of the .tflite: the interpreter's nodes before the default delegate is applied (at
    allocation) and the DELEGATE nodes after it. A node ran on XNNPACK when a tensor it makes leaves a delegate
    partition or stays inside one (made and used only by delegated nodes); it fell back to LiteRT's own kernels
    when what it makes enters a partition or the graph's output from outside (see _delegated_nodes). The share
    of the multiply-accumulates (convolutions, fully connected, batch matmul) delegated is what the floor
    judges: one large op left out is slow whatever the node count says."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    nodes = interp._get_ops_details()  # the model's own ops: the default delegate is applied at allocation
    interp.allocate_tensors()
    kernels = [o for o in interp._get_ops_details()[len(nodes):] if o["op_name"] == "DELEGATE"]
    outputs = {int(d["index"]) for d in interp.get_output_details()}
    delegated = _delegated_nodes(nodes, kernels, outputs)
    shapes = {int(t["index"]): [int(x) for x in t["shape"]] for t in interp.get_tensor_details()}
    macs = {o["index"]: _macs(o, shapes) for o in nodes}
    total, left_macs = sum(macs.values()), sum(v for i, v in macs.items() if i not in delegated)
    left: dict[str, int] = {}
    for o in nodes:
        if o["index"] not in delegated:
            left[o["op_name"]] = left.get(o["op_name"], 0) + 1
    return {"delegate": "XNNPACK", "nodes": len(nodes), "delegated_nodes": len(delegated),
            "partitions": len(kernels), "delegated_fraction": len(delegated) / len(nodes) if nodes else 1.0,
            "non_delegated_ops": sorted(f"{k} x{v}" for k, v in left.items()), "macs": total,
            "non_delegated_macs": left_macs, "delegated_compute": 1.0 - left_macs / total if total else 1.0}


def _delegated_nodes(nodes: list[dict], kernels: list[dict], outputs: set[int]) -> set[int]:
    """Indices of the nodes the delegate kernels replaced, from the tensors the kernels take and give: a
    partition's inputs come from outside it, its outputs from inside; a tensor neither takes nor gives is
    internal to one side, so its maker and users are on the same side (resolved until nothing changes)."""
    k_in = {int(t) for k in kernels for t in k["inputs"]}
    k_out = {int(t) for k in kernels for t in k["outputs"]}
    side: dict[int, bool] = {}
    made = {int(t): o["index"] for o in nodes for t in o["outputs"]}
    users: dict[int, list[int]] = {}
    for o in nodes:
        for t in o["inputs"]:
            users.setdefault(int(t), []).append(o["index"])
    for o in nodes:
        outs = {int(t) for t in o["outputs"]}
        if outs & k_out:
            side[o["index"]] = True
        elif outs & (k_in | outputs) or not kernels:
            side[o["index"]] = False
    changed = True
    while changed:
        changed = False
        for t, maker in made.items():
            if t in k_in or t in k_out or t in outputs:
                continue  # crosses a boundary: says nothing about the two sides
            group = [maker, *users.get(t, [])]
            known = {side[i] for i in group if i in side}
            if len(known) == 1:
                value = known.pop()
                for i in group:
                    if i not in side:
                        side[i], changed = value, True
    return {i for i, d in side.items() if d}


def _macs(op: dict, shapes: dict[int, list[int]]) -> int:
    """Multiply-accumulates of one LiteRT op from its tensors' shapes (0 for ops without a weight product)."""
    name = op["op_name"]
    if name not in MAC_OPS:
        return 0
    ins = [shapes.get(int(t), []) for t in op["inputs"] if int(t) >= 0]
    out = shapes.get(int(op["outputs"][0]), [])
    if len(ins) < 2 or not out:
        return 0
    w, n_out = ins[1], int(np.prod(out))
    if name == "DEPTHWISE_CONV_2D":  # weights [1, kh, kw, channels]
        return n_out * int(np.prod(w[1:3]))
    if name in ("CONV_2D", "CONV_3D"):  # weights [out, kh, kw, in] / [kd, kh, kw, in, out]
        return n_out * (int(np.prod(w[1:])) if name == "CONV_2D" else int(np.prod(w[:-1])))
    if name == "TRANSPOSE_CONV":  # inputs: output shape, weights [out, kh, kw, in], input
        return int(np.prod(ins[2])) * int(np.prod(w[:3])) if len(ins) > 2 else 0
    return n_out * (w[-1] if name == "FULLY_CONNECTED" else ins[0][-1])  # FC: [out, in]; BMM: [.., m, k]


def _qat(ctx: BuildContext, model, opt: LitertOptions, example: tuple) -> tuple[str, dict[str, Any]]:
    """Static int8 by quantization-aware distillation from the fp32 student (edgebundle.calibration.qat) under
    litert-torch's quantizer, its observers as frozen fake quantizers; converted as the static form is."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    from edgebundle.calibration.qat import fake_quant_config
    from edgebundle.targets.common import qat_program

    # is_qat off: it only adds litert-torch's conv + BatchNorm annotators, which fail against torchao 0.18's pattern
    # matcher ("Expected `mod` to be an instance of `torch.nn.Module`"); BatchNorm is folded before QAT anyway
    config = dataclasses.replace(fake_quant_config(get_symmetric_quantization_config(is_per_channel=opt.per_channel)),
                                 is_qat=False)
    quantizer = PT2EQuantizer().set_global(config)
    tool = ("PT2E QAT (torchao prepare_qat_pt2e/convert_pt2e) + litert-torch PT2EQuantizer's observers as frozen "
            "fake quantizers, converted with QuantConfig(pt2e_quantizer)")
    r, record = qat_program(ctx, model, opt.qat, quantizer, tool, fold_quantize=False)
    _convert(r.model, example, ctx.workdir / "model.tflite", QuantConfig(pt2e_quantizer=quantizer))
    return tool, record


def tensor_dtypes(path: Path) -> dict[str, int]:
    """How many of the model's tensors have each dtype (int8 bundles hold int8 tensors)."""
    from ai_edge_litert.interpreter import Interpreter

    counts: dict[str, int] = {}
    for t in Interpreter(model_path=str(path)).get_tensor_details():
        name = np.dtype(t["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    return counts


@register_target("litert", capabilities=Capabilities(precisions=("int8", "fp32"), extra="litert",
                                                      runtime="ai_edge_litert"),
                 options=LitertOptions)
class LitertTarget(TargetBase):
    def unavailable_reason(self, options: LitertOptions | None = None) -> str | None:
        return _missing()

    def pending_reason(self, options: LitertOptions | None = None) -> str | None:
        return None  # converts and times its own artifact on this machine

    def start(self, ctx: BuildContext, opt: LitertOptions) -> Work:
        import torch

        if ctx.load_model is None:
            raise StageError("the litert target starts from the PyTorch student; none was given")
        names = [s.name for s in ctx.recipe.inputs]
        model = ctx.load_model().cpu().eval()
        example = tuple(torch.from_numpy(np.ascontiguousarray(ctx.calibration.inputs[n][:1])) for n in names)
        work = Work(opt, {"delegate": "XNNPACK", "batch": 1, "inputs": names},
                    {"model": model, "names": names, "example": example, "files": []})
        if opt.precision == "fp32" or opt.also_fp32:
            name = "model.tflite" if opt.precision == "fp32" else "model.fp32.tflite"
            _convert(model, example, ctx.workdir / name)
            work.state["files"].append(name)
        return work

    def fp32(self, ctx: BuildContext, work: Work) -> Built:
        return self._built(ctx, work, {})

    def int8(self, ctx: BuildContext, work: Work) -> Built:
        """int8 in the form `activations` names (under auto, each form judged on validation inputs in turn),
        or by quantization-aware distillation (`qat`); the contract then judges it on the test split."""
        opt = work.opt
        mode, tool, tried, qat_record = self._forms(ctx, work)
        work.state["files"].insert(0, "model.tflite")
        dtypes = tensor_dtypes(ctx.workdir / "model.tflite")
        if not dtypes.get("int8"):
            raise StageError(f"litert-torch's int8 conversion holds no int8 tensors ({dtypes}): not an int8 model")
        weights = "per-channel" if opt.per_channel or mode == "dynamic" else "per-tensor"
        quant = {"tool": tool, "activations": mode,
                 "scheme": (f"int8 symmetric, {weights} weights, static activations, int8 input and output"
                            if mode == "static" else
                            f"int8 {weights} weights (embedding tables too), activations quantized per inference"),
                 **({"calibration": {"method": "observers (litert-torch quantizer)", "samples": len(ctx.calibration)}}
                    if mode == "static" else {}),
                 **({"activations_tried_on_val": tried} if tried else {}),
                 **({"qat": qat_record} if qat_record else {}),
                 "tensor_dtypes": dtypes}
        return self._built(ctx, work, quant)

    @staticmethod
    def _forms(ctx: BuildContext, work: Work) -> tuple[str, str, list[dict[str, Any]], dict[str, Any] | None]:
        """model.tflite in the first form that holds the budget on validation inputs, QAT (static) when asked
        or when post-training int8 missed it: (activations, tool, what was tried, the QAT record)."""
        from edgebundle.targets.common import judge_on_val, pt2e_plan

        opt, names, example = work.opt, work.state["names"], work.state["example"]
        order, qat = pt2e_plan(ctx, opt.activations, opt.qat.enabled, ["dynamic", "static"])
        judge = lambda: judge_on_val(ctx, LitertSession(ctx.workdir / "model.tflite", threads=ctx.threads,  # noqa: E731
                                                        input_names=names))
        tried: list[dict[str, Any]] = []
        mode, tool, within = "static", "", False
        for mode in order:
            tool = _int8(ctx, work.state["model"], example, names, opt.per_channel, mode == "dynamic")
            if len(order) == 1 and qat == "off":
                break
            v = judge()
            within = v.within or v.judged_nothing  # nothing judged on val: the test split decides
            tried.append({"activations": mode, "val_value": round(float(v.value), 6), "within_budget": v.within})
            if within:
                break
        qat_record = None
        if qat == "on" or (qat == "auto" and not within):
            mode = "static"
            tool, qat_record = _qat(ctx, work.state["model"], opt, example)
            v = judge()
            tried.append({"activations": "static", "qat": True, "val_value": round(float(v.value), 6),
                          "within_budget": v.within})
        return mode, tool, tried, qat_record

    @staticmethod
    def _built(ctx: BuildContext, work: Work, quant: dict[str, Any]) -> Built:
        """The Built record, once XNNPACK took enough of the model's compute (else a StageError naming what it
        left to LiteRT's own kernels); the delegation is recorded in the manifest's runtime."""
        files, opt = work.state["files"], work.opt
        info = delegation(ctx.workdir / "model.tflite")
        if info["delegated_compute"] < opt.min_delegated_compute:
            raise StageError(f"XNNPACK took only {info['delegated_compute']:.0%} of the model's multiply-accumulates "
                             f"(below min_delegated_compute {opt.min_delegated_compute:.0%}); left to LiteRT's own "
                             f"kernels: {', '.join(info['non_delegated_ops'])}")
        return Built("model.tflite", tuple(files), opt.precision, quant, {**work.runtime, "delegation": info},
                     notes=(HOST_NOTE,),
                     fp32_file="model.fp32.tflite" if "model.fp32.tflite" in files else None)

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]) -> "LitertSession":
        return LitertSession(model_path, threads=threads, input_names=runtime.get("inputs", []))


class LitertSession(SessionBase):
    """ai_edge_litert's interpreter (XNNPACK by default) at batch 1, through the device runner's LitertRunner: a
    larger batch is fed one sample at a time; int8 inputs are quantized and int8 outputs dequantized with the
    model's own scales."""

    def __init__(self, model_path: Path, *, threads: int, input_names: list[str]) -> None:
        why = _missing()
        if why:
            raise TargetUnavailable(why)
        from ai_edge_litert.interpreter import Interpreter

        from edgebundle.core.device_runner import LitertRunner

        try:
            interp = Interpreter(model_path=str(model_path), num_threads=threads)
            interp.allocate_tensors()
        except Exception as e:  # the interpreter raises ValueError/RuntimeError for bad files
            raise StageError(f"ai_edge_litert cannot load {model_path.name}: {e}") from e
        self.runner = LitertRunner(interp, input_names)
        self.input_names = self.runner.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner(feeds)

    def close(self) -> None:
        self.runner = None
