"""ONNX graph analysis the targets read: which MatMuls carry constant weights, how many multiply two
activations (unfused attention), and an encoder's attention shape (heads, hidden width)."""

from __future__ import annotations

from pathlib import Path


def _constants(graph) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def weighted_matmuls(model: Path) -> list[str]:
    """MatMul/Gemm nodes with a constant weight (what dynamic int8 quantizes), in graph order."""
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    const = _constants(g)
    return [n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in const]


def attention_matmuls(model: Path) -> int:
    """MatMuls of two activations (Q.K^T, softmax.V): attention, unfused. CNNs and MLPs have none."""
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    const = _constants(g)
    return sum(1 for n in g.node if n.op_type == "MatMul" and not (set(n.input) & const))


def attention_shape(model_path: Path) -> tuple[int, int]:
    """(heads, heads x head size) from the graph's split into heads: the most common 4-element Reshape
    target (batch, sequence, heads, head size) whose last two multiply to a constant MatMul's output width.
    (0, 0) when none is found: the optimizer then guesses, and it guesses wrong on real exports (on
    all-MiniLM-L6-v2 it fuses no attention at all)."""
    import collections

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer if len(i.dims) <= 2}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims:
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    widths = {int(consts[n.input[1]].shape[-1]) for n in g.node
              if n.op_type == "MatMul" and n.input[1] in consts and consts[n.input[1]].ndim == 2}
    concats = {n.output[0]: n for n in g.node if n.op_type == "Concat"}

    def target(name: str) -> list[int] | None:  # a constant shape, or a Concat of pieces (-1: not constant)
        if name in consts:
            return [int(v) for v in consts[name].reshape(-1)]
        if name in concats:
            parts = [consts[i].reshape(-1).tolist() if i in consts and consts[i].size == 1 else [-1]
                     for i in concats[name].input]
            return [int(v) for p in parts for v in p]
        return None

    producer = {o: n for n in g.node for o in n.output}

    def feeding_width(name: str) -> int | None:  # the constant MatMul a few Adds upstream of a tensor
        for _ in range(3):
            n = producer.get(name)
            if n is None:
                return None
            if n.op_type == "MatMul" and n.input[1] in consts and consts[n.input[1]].ndim == 2:
                return int(consts[n.input[1]].shape[-1])
            if n.op_type not in ("Add", "Mul"):
                return None
            name = next((i for i in n.input if i not in consts), n.input[0])
        return None

    seen: collections.Counter = collections.Counter()
    for n in g.node:
        if n.op_type == "Reshape" and len(n.input) > 1:
            shape, width = target(n.input[1]), feeding_width(n.input[0])
            if shape is None or len(shape) != 4 or shape[3] <= 0 or width is None or width not in widths:
                continue
            heads = shape[2] if shape[2] > 0 else width // shape[3]
            if heads * shape[3] == width:
                seen[(heads, width)] += 1
    return seen.most_common(1)[0][0] if seen else (0, 0)
