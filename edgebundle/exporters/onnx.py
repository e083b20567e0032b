"""torch -> ONNX with `torch.onnx.export(dynamo=True)`.

Why this exporter: it is torch.export-based, the exporter PyTorch maintains (the TorchScript exporter is
deprecated since 2.9), it folds BatchNorm and runs onnxscript's optimizer, and its dynamic shapes are
checked by torch.export instead of traced and hoped for. Why opset 20 by default: it is the exporter's
native opset (no version conversion), ONNX Runtime >= 1.17, OpenVINO and TensorRT 10 all read it, and
per-channel Q/DQ needs >= 13.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgebundle.core.errors import StageError
from edgebundle.core.data import Split, iter_feeds
from edgebundle.core.metrics import compare, cosine  # noqa: F401  (cosine: re-exported)
from edgebundle.core.session import OrtSession
from edgebundle.core.recipe import ExportStage, InputSpec

EXPORTER = "torch.onnx.export(dynamo=True)"


@dataclass(frozen=True)
class Parity:
    output: str
    max_abs: float
    cosine: float
    samples: int


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(e: BaseException) -> BaseException:
    """The innermost cause: the exporter wraps the real reason ("No ONNX function found for <op>")."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def _dynamic_shapes(specs: list[InputSpec]):
    shapes = []
    for s in specs:
        shapes.append({axis: torch.export.Dim(name) for axis, name in s.dynamic_axes.items()} or None)
    return tuple(shapes)


def _placeholder(i: int) -> str:
    return f"edgebundle_output_{i}"


def name_outputs(path: Path, outputs: list[str]) -> None:
    """Give the graph outputs the recipe's names. The exporter names values after the ops that make them
    (`embedding`, `linear`, ...), so a user's output name can already be taken by an inner value: that
    value is renamed first (to `<name>__inner`), keeping the graph in single static assignment form."""
    model = onnx.load(str(path))
    g = model.graph
    if len(g.output) != len(outputs):
        raise StageError(f"the model returns {len(g.output)} output(s); the recipe names {len(outputs)}: "
                         f"{', '.join(outputs)}")
    taken = ({i.name for i in g.input} | {i.name for i in g.initializer} | {v.name for v in g.value_info}
             | {o for n in g.node for o in n.output})

    def rename(old: str, new: str) -> None:
        for n in g.node:
            n.input[:] = [new if x == old else x for x in n.input]
            n.output[:] = [new if x == old else x for x in n.output]
        for coll in (g.input, g.output, g.value_info, g.initializer):
            for v in coll:
                if v.name == old:
                    v.name = new

    for i, want in enumerate(outputs):
        have = g.output[i].name
        if have == want:
            continue
        if want in taken:
            inner = want + "__inner"
            while inner in taken:
                inner += "_"
            rename(want, inner)
            taken.add(inner)
        rename(have, want)
        taken.add(want)
    onnx.save(model, str(path))


def torchscript_opset(cfg: ExportStage) -> int:
    """The TorchScript exporter's opset: 17 when chosen automatically (from opset 18 on, ReduceMean takes
    its axes as an input and ONNX Runtime's BERT fusions no longer match LayerNorm, SkipLayerNorm or
    Attention); the recipe's, up to the exporter's 20, when asked for by name."""
    return 17 if cfg.exporter == "auto" else min(cfg.opset, 20)


def resolve_exporter(model: nn.Module, cfg: ExportStage) -> str:
    """auto: the TorchScript exporter for models with Hugging Face BERT-style self-attention (query/key/value
    Linears and num_attention_heads), whose graph ONNX Runtime's BERT fusions match; else dynamo."""
    if cfg.exporter != "auto":
        return cfg.exporter
    hf_attention = any(all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value"))
                       and isinstance(getattr(m, "num_attention_heads", None), int) for m in model.modules())
    return "torchscript" if hf_attention else "dynamo"


def export(model: nn.Module, specs: list[InputSpec], outputs: list[str], cfg: ExportStage, out: Path) -> str:
    """Export to `out`; returns the exporter used (dynamo or torchscript)."""
    from edgebundle.core.modelio import example_inputs

    model.eval()  # not `model = model.eval()`: an exported program's eval (torchao's) returns None
    args = example_inputs(specs)
    which = resolve_exporter(model, cfg)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    names = [_placeholder(i) for i in range(len(outputs))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opset = torchscript_opset(cfg)
            if which == "dynamo":
                program = torch.onnx.export(
                    model, args, input_names=[s.name for s in specs], output_names=names,
                    opset_version=cfg.opset, dynamo=True, dynamic_shapes=_dynamic_shapes(specs),
                    external_data=False, verbose=False, optimize=True,
                )
                program.save(str(out))
                got = program.model.opset_imports.get("", 0)
                if got != cfg.opset:  # its version converter gave up for this model
                    if cfg.exporter != "auto" or cfg.opset > 20:
                        raise StageError(f"{EXPORTER} wrote opset {got}, not the opset {cfg.opset} asked for (its "
                                         "version converter cannot go there for this model); use exporter: "
                                         "torchscript or auto")
                    which, opset = "torchscript", cfg.opset  # auto: TorchScript writes the opset asked for itself
            if which == "torchscript":
                axes = {s.name: {a: str(label) for a, label in s.dynamic_axes.items()} for s in specs}
                torch.onnx.export(model, args, str(out), input_names=[s.name for s in specs], output_names=names,
                                  opset_version=opset, dynamo=False, dynamic_axes=axes or None,
                                  do_constant_folding=True)
        name_outputs(out, outputs)
    except StageError:
        raise
    except Exception as e:  # the exporter raises many types (torch._dynamo, onnxscript, export errors)
        root = _root_cause(e)
        msg = " ".join(_ANSI.sub("", str(root)).split())
        raise StageError(f"{EXPORTER} cannot export this model (opset {cfg.opset}): "
                         f"{type(root).__name__}: {msg[:400]}") from e
    try:
        onnx.checker.check_model(str(out), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(out), str(out), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise StageError(f"exported ONNX fails the onnx checker: {str(e).splitlines()[0]}") from e
    return which


def check_parity(model: nn.Module, onnx_path: Path, split: Split, specs: list[InputSpec], outputs: list[str],
                 cfg: ExportStage) -> list[Parity]:
    """Compare ONNX Runtime fp32 outputs with PyTorch's on real inputs; raise naming the output on failure."""
    sub = split.head(cfg.parity.samples)
    got: list[list[np.ndarray]] = [[] for _ in outputs]
    ref: list[list[np.ndarray]] = [[] for _ in outputs]
    batch = 16 if all(0 in s.dynamic_axes for s in specs) else 1
    with torch.no_grad(), OrtSession(onnx_path, threads=1) as sess:
        for feeds in iter_feeds(sub, specs, batch):
            o = sess.run(feeds)
            t = model(*[torch.from_numpy(feeds[s.name]) for s in specs])
            t = t if isinstance(t, (tuple, list)) else [t]
            for i in range(len(outputs)):
                got[i].append(o[i])
                ref[i].append(t[i].numpy())
    report = []
    for i, name in enumerate(outputs):
        a, b = np.concatenate(got[i]), np.concatenate(ref[i])
        c = compare(a, b)
        p = Parity(name, c.max_abs, c.cosine, c.samples)
        if p.max_abs > cfg.parity.max_abs or p.cosine < cfg.parity.min_cosine:
            raise StageError(
                f"export parity failed for output '{name}': max_abs={p.max_abs:.3g} (limit {cfg.parity.max_abs:g}), "
                f"cosine={p.cosine:.6f} (limit {cfg.parity.min_cosine:g}) over {p.samples} samples"
            )
        report.append(p)
    return report
