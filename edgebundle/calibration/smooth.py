"""SmoothQuant on an ONNX graph (Xiao et al., 2023): move activation outliers into the weights before int8.

Dynamic int8 gives each activation tensor one scale per inference, so a few outlier channels (BERT's
FFN and attention inputs reach 20x their 99.9th percentile) crush the resolution of all the others. For
every MatMul (or fused Attention) with a constant weight W (K x N), grouped by the activation they read (q, k and v share
theirs), the input channel j is divided by s_j and the weight row j multiplied by it:

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)        (alpha: how much of the range moves)

A `Mul` by 1/s before the group's MatMuls carries the first half, so the graph stays exact in fp32 (a
post-LayerNorm encoder's LayerNorm output is also its residual, so folding 1/s into the LayerNorm would
not be). max|X_j| comes from calibration inputs run through the fp32 graph. The Mul costs one elementwise
pass over each group's input, small next to its MatMuls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebundle.core.data import Split, iter_feeds
from edgebundle.core.recipe import InputSpec

SUFFIX = "_smooth_inv_scale"


def _groups(model) -> dict[str, list]:
    """Activation name -> the MatMul nodes (and ONNX Runtime's fused Attention nodes) that read it with a
    constant 2-D weight as their second input: input channel j meets weight row j in both."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    groups: dict[str, list] = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Attention") or len(n.input) < 2 or n.input[1] not in inits \
                or n.input[0] in inits or (n.op_type == "MatMul" and len(n.input) != 2):
            continue
        w = inits[n.input[1]]
        if len(w.dims) != 2 or uses.get(n.input[1], 0) != 1 or numpy_helper.to_array(w).dtype != np.float32:
            continue
        groups.setdefault(n.input[0], []).append(n)
    return groups


def channel_max(model_path: Path, names: list[str], split: Split, specs: list[InputSpec],
                threads: int = 2) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of the named tensors over every input of `split`."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every named tensor kept
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out: dict[str, np.ndarray] = {}
    for feed in iter_feeds(split, specs, 16):
        for name, value in zip(names, sess.run(names, feed)):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            out[name] = np.maximum(out[name], m) if name in out else m
    return out


def smooth(src: Path, dst: Path, split: Split, specs: list[InputSpec], alpha: float,
           amax: dict[str, np.ndarray] | None = None) -> dict[str, object]:
    """Write the smoothed graph to `dst`; returns what was done (and the activation maxima, for reuse at
    other alphas)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    groups = _groups(model)
    if amax is None:
        amax = channel_max(src, list(groups), split, specs)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    smoothed = 0
    for act, consumers in groups.items():
        x = amax.get(act)
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in consumers]
        if x is None or any(w.shape[0] != x.shape[0] for w in ws):
            continue
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        s = np.clip(np.maximum(x, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1.0 - alpha), 1e-5, None)
        s = s.astype(np.float32)
        for n, w in zip(consumers, ws):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
        inv, scaled = f"{act}{SUFFIX}", f"{act}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        mul = onnx.helper.make_node("Mul", [act, inv], [scaled], name=f"{act}_smooth")
        for n in consumers:
            n.input[0] = scaled
        nodes.insert(min(nodes.index(n) for n in consumers), mul)
        smoothed += len(consumers)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return {"alpha": alpha, "matmuls": smoothed, "groups": len(groups), "amax": amax}
