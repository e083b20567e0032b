"""TensorRT target: an explicitly quantized (Q/DQ) ONNX model, built into engines on the GPU it targets.

Two halves:

1. On any machine (CPU is enough): the fp32 ONNX model is quantized with `onnxruntime.quantization`
   into the Q/DQ form TensorRT's explicit quantization expects -- signed int8, symmetric (zero point 0)
   activations per tensor, per-channel weights, Q/DQ only on the inputs of Conv/ConvTranspose/Gemm/
   MatMul, biases left in float for TensorRT to fuse -- calibrated on the recipe's data. The placement is
   checked against those rules (`qdq_problems`) and the model's int8 accuracy is measured through ONNX
   Runtime CPU, which executes the same Q/DQ arithmetic. ORT's quantizer was chosen over NVIDIA
   ModelOpt's ONNX PTQ because it is already a dependency, runs on CPU-only machines with the same
   calibration readers as the ORT target, and exposes every option the rules above need.
2. Where the `tensorrt` package and an NVIDIA GPU exist: engines are built with the `tensorrt` Python
   API (INT8 + FP16, plus an FP16-only engine for comparison), an optimisation profile for a dynamic
   batch axis, a fixed builder optimisation level and a timing cache stored in the bundle; latency is
   timed with CUDA events around `execute_async_v3`. Without them the bundle is written with
   `status: pending` and `edgebundle build WORK --target tensorrt` finishes it on a GPU machine.

Engines are tied to the GPU model and TensorRT version: the manifest records both, and opening an engine
on a different GPU or TensorRT version is refused (`portability_problem`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgebundle.calibration.accuracy import layers_kept_float
from edgebundle.calibration.readers import SplitReader
from edgebundle.core.session import SessionBase
from edgebundle.core.errors import StageError, TargetUnavailable
from edgebundle.targets.base import BuildContext, Built
from edgebundle.targets.registry import Capabilities, register_target

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# per-channel weight axis TensorRT accepts: output channels (Conv K, ConvTranspose is [C, K/g, ...]),
# Gemm with transB=1 stores [N, K] (axis 0), MatMul/Gemm without transB store [K, N] (axis 1)
QDQ_FILE = "model.qdq.onnx"
PENDING = "pending (needs an NVIDIA GPU with the tensorrt package: pip install edgebundle[tensorrt])"
# The Q/DQ model judged on ONNX Runtime CPU with no graph optimisation: each DequantizeLinear runs, then the
# float layer, so an int8 layer's sum is the exact integer sum times its scales (up to fp32 rounding), as
# TensorRT's int8 kernels accumulate in 32 bits. ORT's fused integer kernels would compute it the host CPU's
# way: on CPUs without VNNI, u8 x s8 pair sums saturate in 16 bits (EfficientNet-Lite1 on an AVX2 EPYC: 95.2 %
# of the confident crops, against 100 % computed this way), which no GPU does.
GPU_ARITHMETIC = "disable"


class TensorRtOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN/inf (recipe rule)

    precision: Literal["int8", "fp16"] = "int8"
    fp16_fallback: bool = Field(True, description="int8 engine may run non-quantized layers in fp16")
    also_fp16_engine: bool = Field(True, description="build an fp16-only engine too, for comparison")
    builder_optimization_level: int = Field(3, ge=0, le=5, description="fixed, for reproducible builds")
    workspace_mib: int = Field(1024, ge=16)
    opt_batch: int = Field(1, ge=1)
    max_batch: int = Field(32, ge=1, description="top of the optimisation profile for a dynamic batch axis")
    throughput_batch: int = Field(32, ge=1, description="batch for the throughput figure")
    device: int = Field(0, ge=0, description="CUDA device index")
    accuracy_control: bool = Field(True, description="over max_accuracy_drop: keep the most sensitive layers float")
    layer_errors: bool = Field(True, description="record the per-layer error table (`edgebundle explain`)")


def _have_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _cuda_ok() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def engine_pending_reason() -> str | None:
    """Why engines cannot be built here (None where they can)."""
    if not _have_tensorrt():
        return "the tensorrt package is not installed (pip install edgebundle[tensorrt])"
    if not _cuda_ok():
        return "no NVIDIA GPU with CUDA on this machine"
    return None


# ---- Q/DQ model -----------------------------------------------------------------------------------------

def quantize_for_tensorrt(fp32: Path, out: Path, ctx: BuildContext) -> dict[str, Any]:
    """Q/DQ model for TensorRT's explicit quantization, with accuracy control: the int8 drop is measured
    through ONNX Runtime CPU on the validation split and, over budget, the most sensitive layers stay float
    (TensorRT then runs them in fp16/fp32)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgebundle.calibration.accuracy import control_accuracy
    from edgebundle.targets.common import calibrate_method, calibration_extra_options, val_outputs

    opt: TensorRtOptions = ctx.options
    cal = ctx.spec.calibration
    reader = SplitReader(ctx.calibration, ctx.recipe.inputs)
    pre = out.with_name("preprocessed.onnx")
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
             # Q/DQ on the inputs of weighted layers only: their outputs stay float (TensorRT fuses the
             # following Q into the layer where the next consumer is quantized)
             "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS)}
    extra.update(calibration_extra_options(cal, len(reader)))

    def quantize(exclude: list[str]) -> None:
        reader.rewind()
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(WEIGHTED_OPS), calibrate_method=calibrate_method(cal.method),
                        nodes_to_exclude=exclude, extra_options=extra)

    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize([])
        control = control_accuracy(pre, out, quantize, split=ctx.validation, specs=ctx.recipe.inputs,
                                   contract=ctx.val_contract(), outputs=lambda m: val_outputs(m, ctx, GPU_ARITHMETIC),
                                   p50_ms=None,
                                   layer_errors=opt.layer_errors, control=opt.accuracy_control)
    except (RuntimeError, ValueError, KeyError, IndexError) as e:
        raise StageError(f"onnxruntime.quantization (TensorRT Q/DQ) failed: {type(e).__name__}: {e}") from e
    finally:
        pre.unlink(missing_ok=True)
    if layers_kept_float(control):
        control["accuracy_budget"]["latency_cost"] = "not measured: needs the TensorRT engine on a GPU"
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ (TensorRT explicit quantization)",
            "activations": "int8 symmetric, per tensor", "weights": "int8 symmetric, per channel",
            "op_types": list(WEIGHTED_OPS), "bias": "float (fused by TensorRT)",
            "calibration": {"method": cal.method, "samples": reader.count,
                            **({"percentile": cal.percentile} if cal.method == "percentile" else {})},
            "accuracy_measured_with": "ONNX Runtime CPU (the Q/DQ model)", **control}


class _Graph:
    """An ONNX graph's initializers, producers and constant values, for the placement rules."""

    def __init__(self, model) -> None:
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}

    def const(self, name: str):
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None


def _attr(node, key: str, default: int) -> int:
    for a in node.attribute:
        if a.name == key:
            return a.i
    return default


def qdq_problems(model, float_nodes: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Where a Q/DQ ONNX model breaks TensorRT's explicit-quantization rules (empty list: none).

    Rules checked: every Q/DQ is int8 with zero point 0 (TensorRT is symmetric-only); activation scales
    are per tensor; weights are per channel on the output-channel axis; both the data and the weight
    input of each Conv/ConvTranspose/Gemm/MatMul with constant weights come from a DequantizeLinear;
    biases are float. Layers named in `float_nodes` (kept in float by accuracy control) are exempt.
    """
    g = _Graph(model)
    problems = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if zp is None:
                problems.append(f"{n.name}: no zero point (defaults to uint8; TensorRT needs int8)")
            elif zp.dtype != np.int8:
                problems.append(f"{n.name}: zero point is {zp.dtype}, TensorRT needs int8")
            elif np.any(zp != 0):
                problems.append(f"{n.name}: non-zero zero point (TensorRT quantization is symmetric)")
    for out in model.graph.output:
        n = g.producer.get(out.name)
        if n is not None and n.op_type == "DequantizeLinear":
            problems.append(f"graph output {out.name} is quantized: the model's output loses precision")
    for n in model.graph.node:
        if n.op_type in WEIGHTED_OPS and n.name not in float_nodes:
            problems += _layer_problems(g, n)
    return problems


def _layer_problems(g: _Graph, n) -> list[str]:
    """One weighted layer: both inputs dequantized, activation scale per tensor, weight scales on the output-
    channel axis, bias float."""
    problems = []
    data, weight = g.producer.get(n.input[0]), g.producer.get(n.input[1])
    w_dq_input = weight.input[0] if weight is not None and weight.op_type == "DequantizeLinear" else None
    if w_dq_input is None:
        if n.op_type == "MatMul" and g.const(n.input[1]) is None:
            return []  # activation x activation MatMul: not a weighted layer
        return [f"{n.name}: weight input is not dequantized (int8 weights expected)"]
    if data is None or data.op_type != "DequantizeLinear":
        problems.append(f"{n.name}: data input is not dequantized (Q/DQ belongs on the layer's inputs)")
    else:
        s = g.const(data.input[1])
        if s is not None and s.size != 1:
            problems.append(f"{n.name}: activation scale is per channel; TensorRT needs per tensor")
    w_scale, w = g.const(weight.input[1]), g.const(w_dq_input)
    if w_scale is not None and w is not None and w_scale.size > 1:
        want = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if _attr(n, "transB", 0) else 1}.get(n.op_type, w.ndim - 1)
        axis = _attr(weight, "axis", 1)
        if axis % w.ndim != want or w_scale.size != w.shape[want]:
            problems.append(f"{n.name}: weight scales on axis {axis}, TensorRT wants the output-channel "
                            f"axis {want}")
    if len(n.input) > 2 and n.input[2] and n.op_type in ("Conv", "ConvTranspose", "Gemm"):
        b = g.producer.get(n.input[2])
        if b is not None and b.op_type == "DequantizeLinear":
            problems.append(f"{n.name}: bias is quantized; TensorRT expects a float bias to fuse")
    return problems


# ---- engines (only where tensorrt and a GPU exist; not exercised on machines without them) ---------------

def gpu_identity(device: int = 0) -> dict[str, Any]:
    """What an engine is tied to: GPU name, compute capability, driver, CUDA and TensorRT versions."""
    import torch

    props = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                            "cuda": torch.version.cuda}
    try:
        import tensorrt as trt

        info["tensorrt"] = trt.__version__
    except ImportError:
        info["tensorrt"] = None
    try:
        import subprocess

        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.split("\n")[device].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def portability_problem(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """An engine only runs on the GPU model and TensorRT version it was built with."""
    for key, what in (("gpu", "GPU"), ("compute_capability", "compute capability"), ("tensorrt", "TensorRT")):
        if recorded.get(key) != current.get(key):
            return (f"this engine was built for {what} {recorded.get(key)!r} but this machine has "
                    f"{current.get(key)!r}: rebuild it here with `edgebundle build WORK --target tensorrt`")
    return None


def build_engine(onnx_path: Path, out: Path, *, int8: bool, fp16: bool, opt: TensorRtOptions,
                 input_shapes: dict[str, list[int]], timing_cache: Path) -> None:
    """Serialize an engine with the documented TensorRT Python API. Needs tensorrt and a GPU."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StageError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opt.workspace_mib << 20)
    config.builder_optimization_level = opt.builder_optimization_level
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = input_shapes[t.name]
        lo, best, hi = ([b if d == -1 else d for d in t.shape] for b in (1, opt.opt_batch, opt.max_batch))
        if -1 in t.shape:
            profile.set_shape(t.name, lo, best, hi)
        else:
            profile.set_shape(t.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise StageError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    out.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


class TrtSession(SessionBase):
    """Runs a serialized engine with torch-allocated device buffers on one CUDA stream."""

    features = frozenset({"gpu_timing"})

    def __init__(self, engine_path: Path, *, runtime: dict[str, Any], device: int = 0) -> None:
        if engine_pending_reason():
            raise TargetUnavailable(f"cannot open {engine_path.name}: {engine_pending_reason()}")
        problem = portability_problem(runtime.get("engine_built_for", {}), gpu_identity(device))
        if problem:
            raise TargetUnavailable(problem)
        import tensorrt as trt
        import torch

        self.torch, self.trt, self.device = torch, trt, torch.device("cuda", device)
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise StageError(f"TensorRT cannot deserialize {engine_path.name}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _bind(self, feeds: dict[str, np.ndarray]):
        torch = self.torch
        for n in self.input_names:
            x = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
            self.context.set_input_shape(n, tuple(x.shape))
            self.context.set_tensor_address(n, x.data_ptr())
            setattr(self, f"_in_{n}", x)  # keep alive
        outs = []
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
            y = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(n, y.data_ptr())
            outs.append(y)
        return outs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self._bind(feeds)
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return [y.float().cpu().numpy() for y in outs]

    def gpu_samples_ms(self, feeds: dict[str, np.ndarray], *, warmup: int, iterations: int) -> list[float]:
        """CUDA-event time of each `execute_async_v3` (inputs already on the device)."""
        torch = self.torch
        self._bind(feeds)
        handle = self.stream.cuda_stream
        for _ in range(warmup):
            self.context.execute_async_v3(handle)
        self.stream.synchronize()
        out = []
        for _ in range(iterations):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(self.stream)
            self.context.execute_async_v3(handle)
            b.record(self.stream)
            b.synchronize()
            out.append(a.elapsed_time(b))
        return out

    def close(self) -> None:
        self.context = self.engine = None


@register_target("tensorrt", capabilities=Capabilities(precisions=("int8", "fp16"), needs_gpu=True, extra="tensorrt",
                                                        runtime="tensorrt"),
                 options=TensorRtOptions)
class TensorRtTarget:
    def unavailable_reason(self, options: TensorRtOptions | None = None) -> str | None:
        return None  # the Q/DQ model can always be prepared; engines may be pending (see pending_reason)

    def pending_reason(self, options: TensorRtOptions | None = None) -> str | None:
        return engine_pending_reason()

    def build(self, ctx: BuildContext) -> Built:
        import onnx

        opt: TensorRtOptions = ctx.options
        qdq = ctx.workdir / QDQ_FILE
        quant: dict[str, Any] = {}
        if opt.precision == "int8":
            quant = quantize_for_tensorrt(ctx.fp32_onnx, qdq, ctx)
            kept_float = set(layers_kept_float(quant))
            problems = qdq_problems(onnx.load(str(qdq)), kept_float)
            if problems:
                raise StageError("the Q/DQ model breaks TensorRT's placement rules: " + "; ".join(problems[:5]))
            quant["placement_checked"] = "TensorRT explicit-quantization rules (edgebundle.targets.tensorrt.qdq_problems)"
        else:
            qdq.write_bytes(ctx.fp32_onnx.read_bytes())
        runtime: dict[str, Any] = {"builder_optimization_level": opt.builder_optimization_level,
                                   "profile_batch": {"min": 1, "opt": opt.opt_batch, "max": opt.max_batch},
                                   "fp16_fallback": opt.fp16_fallback, "device": opt.device}
        why = engine_pending_reason()
        if why:
            runtime["engine"] = PENDING
            return Built(QDQ_FILE, (QDQ_FILE,), opt.precision, quant, runtime, status="pending",
                         eval_file=QDQ_FILE,
                         notes=(f"engine {PENDING}: {why}. The Q/DQ model's accuracy was measured with ONNX "
                                "Runtime CPU; no engine was built and no GPU latency was measured here.",))
        shapes = {i.name: list(i.shape) for i in ctx.recipe.inputs}
        cache = ctx.workdir / "timing.cache"
        engine = ctx.workdir / f"model.{opt.precision}.engine"
        build_engine(qdq, engine, int8=opt.precision == "int8", fp16=opt.fp16_fallback or opt.precision == "fp16",
                     opt=opt, input_shapes=shapes, timing_cache=cache)
        files = [QDQ_FILE, engine.name, cache.name]
        if opt.also_fp16_engine and opt.precision == "int8":
            fp16 = ctx.workdir / "model.fp16.engine"
            build_engine(ctx.fp32_onnx, fp16, int8=False, fp16=True, opt=opt, input_shapes=shapes, timing_cache=cache)
            files.append(fp16.name)
        runtime["engine"] = "built"
        runtime["engine_built_for"] = gpu_identity(opt.device)
        return Built(engine.name, tuple(files), opt.precision, quant, runtime)

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]):
        if model_path.suffix == ".onnx":  # a pending bundle: its Q/DQ model runs on ONNX Runtime CPU
            from edgebundle.core.session import OrtSession

            return OrtSession(model_path, threads=threads, level=GPU_ARITHMETIC)
        return TrtSession(model_path, runtime=runtime, device=int(runtime.get("device", 0)))
