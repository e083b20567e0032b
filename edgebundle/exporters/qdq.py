"""A PT2E int8 program (torchao `convert_pt2e`) -> a Q/DQ ONNX model that ONNX Runtime runs at int8 speed.

The converted program holds quantize/dequantize ops around float ops; `torch.onnx.export(dynamo=True)` turns
them into QuantizeLinear/DequantizeLinear, which ONNX Runtime fuses with the op between them into integer
kernels (QLinearConv, QLinearAdd, QGemm) when the pattern is DequantizeLinear -> op -> QuantizeLinear with
8-bit types that agree. Two things in such an export break that, and `for_ort` rewrites them exactly:

- A zero pad before a convolution (TensorFlow's "same" padding: EfficientNet-Lite has 22) sits between the
  DequantizeLinear and the convolution, so ORT left those convolutions in float: EfficientNet-Lite's export
  ran at 12.0 ms where ORT's own static int8 runs at 3.8 ms (fp32: 7.8 ms). With the pad's input and output
  on one scale (calibration.pt2e's `pads_share_input`), the pad is exact in the integer domain and becomes
  the convolution's own `pads` (asymmetric pads are fine in ONNX).
- XNNPACK's scheme has int8 activations. ORT's x86 kernels take uint8 activations; it converts int8 Q/DQ
  pairs itself but not everywhere, and an Add whose inputs it left on different types stays float. Every
  activation QuantizeLinear/DequantizeLinear is moved to uint8 (zero point + 128: the same grid); weights
  (constant int8 tensors) stay int8.

After both, the EfficientNet-Lite program ran at 3.70 ms against 3.78 ms for ORT's `quantize_static` (64
QLinearConv, 14 QLinearAdd, interleaved in one process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgebundle.core.recipe import ExportStage, InputSpec
from edgebundle.exporters.onnx import export


def export_qdq(program: Any, specs: list[InputSpec], outputs: list[str], out: Path, opset: int = 20) -> dict[str, int]:
    """Export a converted PT2E program (a GraphModule) to `out` with the recipe's inputs, outputs and
    dynamic axes, then `for_ort`. Returns what `for_ort` rewrote."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(program)  # export() calls .eval(), which exported programs refuse unless told
    export(program, specs, outputs, ExportStage(exporter="dynamo", opset=opset), out)
    model = onnx.load(str(out))
    done = for_ort(model)
    onnx.save(model, str(out))
    return done


def for_ort(model: onnx.ModelProto) -> dict[str, int]:
    """Fold exact zero pads into the convolutions after them; int8 activation Q/DQ -> uint8. In place."""
    g = model.graph
    init = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def const(name: str) -> np.ndarray | None:
        if name in init:
            return numpy_helper.to_array(init[name])
        n = producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    folded = _fold_pads(g, producer, const)
    return {"pads_folded": folded, "activation_qdq_to_uint8": _activations_to_uint8(g, const)}


def _fold_pads(g, producer: dict, const) -> int:
    """DequantizeLinear -> zero Pad -> QuantizeLinear (same grid) -> DequantizeLinear -> Conv chains lose the pad
    and its Q/DQ pair; each convolution takes the padding into its own `pads`. Returns how many pads folded."""
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def same_grid(a, b) -> bool:  # two Q/DQ nodes with equal (constant) scale and zero point
        pa, pb = [const(x) for x in a.input[1:3]], [const(x) for x in b.input[1:3]]
        return (len(pa) == len(pb) == 2 and all(x is not None for x in pa + pb)
                and all(np.array_equal(x, y) for x, y in zip(pa, pb)))

    outputs = {o.name for o in g.output}
    dropped: set[int] = set()
    folded = 0
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        convs = _foldable(pad, producer, users, const, same_grid, outputs)
        if convs is None:
            continue
        dq, q, dqs, conv_nodes, spatial = convs
        for c in conv_nodes:
            a = next((a for a in c.attribute if a.name == "pads"), None)
            new = [int(x) for x in (np.add(list(a.ints), spatial) if a is not None else spatial)]
            if a is None:
                c.attribute.append(helper.make_attribute("pads", new))
            else:
                a.ints[:] = new
            c.input[0] = dq.output[0]
        dropped.update(id(n) for n in (pad, q, *dqs))
        folded += 1
    if dropped:
        kept = [n for n in g.node if id(n) not in dropped]
        del g.node[:]
        g.node.extend(kept)
    return folded


def _activations_to_uint8(g, const) -> int:
    """Activation Q/DQ with int8 zero points move to uint8 (zero point + 128: the same grid). Returns how many."""
    moved, renamed = 0, {}
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3:
            continue
        if n.op_type == "DequantizeLinear" and const(n.input[0]) is not None:
            continue  # a weight
        zp = const(n.input[2])
        if zp is None or zp.dtype != np.int8:
            continue
        if n.input[2] not in renamed:
            t = numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), n.input[2] + "_u8")
            g.initializer.append(t)
            renamed[n.input[2]] = t.name
        n.input[2] = renamed[n.input[2]]
        moved += 1
    # recorded value types of the re-typed activations would contradict the graph: ONNX Runtime re-infers them
    retyped = {o for n in g.node if n.op_type == "QuantizeLinear" and n.input[2] in renamed.values() for o in n.output}
    kept_info = [v for v in g.value_info if v.name not in retyped]
    del g.value_info[:]
    g.value_info.extend(kept_info)
    return moved


def _foldable(pad, producer, users, const, same_grid, graph_outputs):
    """For DequantizeLinear -> Pad (constant zero, spatial axes only) -> QuantizeLinear (the same grid) ->
    DequantizeLinear(s) -> Conv (input 0) only: (dq, q, dqs, convs, the pads of the spatial axes in ONNX
    `pads` order); else None."""
    mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant" or len(pad.input) < 2 or (len(pad.input) > 3 and pad.input[3]):
        return None
    pads = const(pad.input[1])
    value = const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    if pads is None or value is None or np.any(value != 0) or pads.ndim != 1 or len(pads) < 6:
        return None
    r = len(pads) // 2
    if np.any(pads[:2]) or np.any(pads[r:r + 2]) or np.any(pads < 0):
        return None
    dq = producer.get(pad.input[0])
    q = users.get(pad.output[0], [])
    if dq is None or dq.op_type != "DequantizeLinear" or len(q) != 1 or q[0].op_type != "QuantizeLinear":
        return None
    q = q[0]
    if not same_grid(dq, q):
        return None
    dqs = users.get(q.output[0], [])
    if {q.output[0], *(d.output[0] for d in dqs)} & graph_outputs:
        return None
    if not dqs or any(d.op_type != "DequantizeLinear" or not same_grid(d, q) for d in dqs):
        return None
    convs = [c for d in dqs for c in users.get(d.output[0], [])]
    if not convs or any(c.op_type != "Conv" or c.input[0] not in {d.output[0] for d in dqs}
                        or any(a.name == "auto_pad" and helper.get_attribute_value(a) not in (b"NOTSET", b"")
                               for a in c.attribute) for c in convs):
        return None
    return dq, q, dqs, convs, np.concatenate([pads[2:r], pads[r + 2:]]).astype(np.int64)
