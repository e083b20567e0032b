"""PT2E quantizers (torchao's `prepare_pt2e` / `prepare_qat_pt2e` annotate graphs with them).

`xnnpack_quantizer`: ExecuTorch's XNNPACKQuantizer (symmetric int8 per-channel weights, asymmetric int8
activations) with the corrections real models needed; the ExecuTorch target lowers its programs to XNNPACK,
and quantization-aware distillation for ONNX Runtime (exporters/qdq.py) exports them as Q/DQ ONNX.
Needs the `executorch` package (`pip install edgebundle[mobile]`), imported when called.
"""

from __future__ import annotations


def _integer_scalar_ops(model) -> None:
    """add/mul of an integer tensor and a Python scalar become add.Scalar/mul.Scalar (in place)."""
    import torch

    scalar_ops = {torch.ops.aten.add.Tensor: torch.ops.aten.add.Scalar,
                  torch.ops.aten.mul.Tensor: torch.ops.aten.mul.Scalar}
    for n in model.graph.nodes:
        if (n.op == "call_function" and n.target in scalar_ops and len(n.args) == 2
                and isinstance(n.args[0], torch.fx.Node) and not isinstance(n.args[1], torch.fx.Node)):
            val = n.args[0].meta.get("val")
            if val is not None and not val.is_floating_point():
                n.target = scalar_ops[n.target]
    model.recompile()


def _zero_pad(n) -> bool:
    """Whether an FX node is a constant pad with zeros (aten.pad or aten.constant_pad_nd)."""
    import torch

    if n.op != "call_function" or n.target not in (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default):
        return False
    arg = lambda i, name, default: n.args[i] if len(n.args) > i else n.kwargs.get(name, default)  # noqa: E731
    if n.target == torch.ops.aten.constant_pad_nd.default:  # (input, pad, value=0)
        mode, value = "constant", arg(2, "value", 0.0)
    else:  # aten.pad: (input, pad, mode="constant", value=None)
        mode, value = arg(2, "mode", "constant"), arg(3, "value", None)
    return mode == "constant" and (value is None or value == 0)


def _share_pad_input(model) -> None:
    """Each user of a zero pad takes the pad's input quantization (SharedQuantizationSpec), in place."""
    import torch
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    for n in model.graph.nodes:
        src = n.args[0] if _zero_pad(n) else None
        a = src.meta.get("quantization_annotation") if isinstance(src, torch.fx.Node) else None
        if a is None or a.output_qspec is None:  # e.g. the graph input: nothing to share
            continue
        for user in n.users:
            ua = user.meta.get("quantization_annotation")
            if ua is not None and n in ua.input_qspec_map:
                ua.input_qspec_map[n] = SharedQuantizationSpec(src)


def xnnpack_quantizer(*, pads_share_input: bool = False):
    """XNNPACKQuantizer with two corrections (executorch 1.x / torchao PT2E), and one option:

    1. ReLU6 (aten.hardtanh 0..6, or aten.relu6 from F.relu6) after a conv is annotated like ReLU (the conv_relu pattern), so the
       activation observer sits after the clamp. Stock, hardtanh shares the observer of the raw conv output
       (-70..+80 on EfficientNet-Lite), leaving 0..6 about 10 of 256 codes: 76 % top-1 agreement with fp32
       on all photo crops, 90 % with the observer after the clamp (and XNNPACK fuses the clamp into the conv).
    2. Integer add/mul with a Python scalar become add.Scalar/mul.Scalar before the quantizer's
       scalar-to-tensor pass, which would make them float32 and break integer index math (Hugging Face's
       attention-mask code indexes with `arange + 0`: IndexError during calibration).

    `pads_share_input`: a zero pad feeding a convolution (TensorFlow's "same" padding, as in EfficientNet-Lite)
    is left unannotated by the stock quantizer, so the convolution's input gets an observer of its own and
    the padded tensor is re-quantized to a second scale. With this, the convolution's input shares the pad
    input's quantization: the pad is then exact in the integer domain and folds into the convolution's own
    padding (exporters/qdq.py), which ONNX Runtime needs to fuse the convolution (QLinearConv).

    The ReLU test is swapped for the duration of `annotate` only and restored after."""
    import torch
    import executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils as xqu
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    hardtanh = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default,  # nn.ReLU6
                torch.ops.aten.relu6.default)  # F.relu6

    class Quantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model):
            _integer_scalar_ops(model)
            return super().transform_for_annotation(model)

        def annotate(self, model):
            orig = xqu.is_relu_node  # read by the conv/linear + relu annotators at call time
            xqu.is_relu_node = lambda n: orig(n) or (n.op == "call_function" and n.target in hardtanh)
            try:
                model = super().annotate(model)
            finally:
                xqu.is_relu_node = orig
            if pads_share_input:
                _share_pad_input(model)
            return model

    return Quantizer()
