"""ONNX Runtime int8 choices for a transformer encoder, side by side in one process.

BERT-mini-shaped encoder (`edgebundle.zoo:bert_mini`, random weights), batch 1, sequence 128, 2 threads.
Every int8 row is built by edgebundle's `ort-cpu` target with one option changed, so the rows differ only
in that choice: BERT fusions (`onnxruntime.transformers.optimizer`) on or off, static QDQ (u8 activations,
per-channel s8 weights, 32 calibration samples) or dynamic int8. The default (`transformer_fusions: auto`,
`mode: auto`) is the fused dynamic row.

    python -m bench.encoder_ort     # writes bench/results/encoder_ort.{json,md}; about 2 minutes
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import interleaved, write
from edgebundle import zoo
from edgebundle.exporters.onnx import cosine, export
from edgebundle.core.data import Split
from edgebundle.core.recipe import ExportStage, TargetSpec, recipe_from_dict
from edgebundle.targets import registry
from edgebundle.targets import BuildContext
from edgebundle.targets.ort_cpu import OrtSession, fuse_transformer

THREADS = 2
INPUT = {"name": "input_ids", "shape": [1, 128], "dtype": "int64", "dynamic_axes": {0: "batch", 1: "seq"}}
VARIANTS = {
    "int8 static QDQ, no fusions": {"transformer_fusions": "off", "mode": "static"},
    "int8 static QDQ, fused": {"transformer_fusions": "on", "mode": "static"},
    "int8 dynamic, no fusions": {"transformer_fusions": "off", "mode": "dynamic"},
    "int8 dynamic, fused (edgebundle default)": {},
}


def main() -> None:
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    calib = rng.integers(3, 30522, size=(32, 128)).astype(np.int64)
    feeds = {"input_ids": rng.integers(3, 30522, size=(1, 128)).astype(np.int64)}
    recipe = recipe_from_dict({"model": {"factory": "edgebundle.zoo:bert_mini"}, "inputs": [INPUT]})
    torch.manual_seed(0)
    model = zoo.bert_mini().eval()
    entry = registry.lookup("ort-cpu")
    fns, outs, info = {}, {}, {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        fp32 = td / "fp32.onnx"
        export(model, recipe.inputs, ["logits"], ExportStage(), fp32)
        fused = td / "fused.onnx"
        info["fp32, fused"] = fuse_transformer(fp32, fused, "on")
        for label, path in (("fp32", fp32), ("fp32, fused", fused)):
            s = OrtSession(path, threads=THREADS)
            fns[label] = lambda s=s: s.run(feeds)
        for label, options in VARIANTS.items():
            wd = td / f"v{len(fns)}"
            wd.mkdir()
            ctx = BuildContext(recipe, TargetSpec(name="ort-cpu", calibration={"samples": 32}),
                               entry.options_model.model_validate(options), fp32, Split({"input_ids": calib}, None),
                               Split({"input_ids": calib}, None), wd, THREADS)
            built = entry.factory().build(ctx)
            info[label] = {"mode": built.quantization.get("mode"),
                           "fusions": built.runtime.get("transformer_fusions", {})}
            s = OrtSession(wd / built.model_file, threads=THREADS)
            fns[label] = lambda s=s: s.run(feeds)
        ref = fns["fp32"]()[0]
        for k, fn in fns.items():
            outs[k] = cosine(np.asarray(fn()[0]), ref)
        timing = interleaved(fns, threads=THREADS)
    base = timing["fp32"]["p50_ms"]
    rows = [f"| {k} | {timing[k]['p50_ms']:.2f} | {timing[k]['iqr_ms'][0]:.2f}–{timing[k]['iqr_ms'][1]:.2f} | "
            f"{base / timing[k]['p50_ms']:.2f}x | {outs[k]:.5f} |" for k in fns]
    payload = {"model": "bert_mini (random weights), batch 1, seq 128", "threads": THREADS,
               "rows": {k: {**timing[k], "cosine_vs_fp32": outs[k], **({"build": info[k]} if k in info else {})}
                        for k in fns}}
    md = ("BERT-mini-shaped encoder (random weights), batch 1, sequence 128, 2 threads, ONNX Runtime CPU; "
          "int8 rows built by the `ort-cpu` target with one option changed.\n\n"
          "| variant | p50 ms | IQR ms | speedup vs ORT fp32 | output cosine vs fp32 |\n|---|---|---|---|---|\n"
          + "\n".join(rows) + "\n")
    write("encoder_ort", payload, md)


if __name__ == "__main__":
    main()
