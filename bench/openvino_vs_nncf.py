"""edgebundle's OpenVINO bundle vs what a user gets by hand with `nncf.quantize` defaults.

ResNet-18 and MobileNetV2 at 1x3x224x224 (random weights, BatchNorm statistics from random data),
2 threads, batch 1, LATENCY hint, all candidates timed in alternating rounds in one process:

- OpenVINO fp32 (convert_model of the ONNX export)
- by hand: `nncf.quantize(ov.convert_model(onnx), nncf.Dataset(32 samples))`, NNCF defaults
- edgebundle's openvino target on the same model (full bias correction)
- edgebundle's openvino target after Torch-Pruning at 30 % and 50 % of channels

Random weights: the pruned rows show latency only (their outputs differ from the unpruned model by
construction); accuracy at equal footing needs trained weights, which the embedded default covers.

    python -m bench.openvino_vs_nncf     # writes bench/results/openvino_vs_nncf.{json,md}
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
from edgebundle.core.modelio import example_inputs
from edgebundle.stages.pruning import count, prune
from edgebundle.core.recipe import ExportStage, PruneStage, TargetSpec, recipe_from_dict
from edgebundle.targets import registry
from edgebundle.targets import BuildContext

THREADS = 2


def main() -> None:
    import nncf
    import openvino as ov

    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, 224, 224)).astype(np.float32)
    probe = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    entry = registry.lookup("openvino")
    target = entry.factory()
    payload, rows = {"models": {}}, []
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        for name, factory in (("ResNet-18", "resnet18"), ("MobileNetV2", "mobilenet_v2")):
            recipe = recipe_from_dict({"model": {"factory": f"edgebundle.zoo:{factory}"},
                                       "inputs": [{"name": "image", "shape": [1, 3, 224, 224]}]})
            spec = TargetSpec(name="openvino")
            opts = entry.options_model()
            variants = {}
            for ratio in (0.0, 0.3, 0.5):
                torch.manual_seed(0)
                model = zoo.set_bn_stats_from_data(getattr(zoo, factory)())
                ex = example_inputs(recipe.inputs)
                macs = count(model, ex)[0]
                if ratio:
                    macs = prune(model, PruneStage(ratio=ratio), ex, train=None, names=["image"]).macs_after
                    model = zoo.set_bn_stats_from_data(model)
                onnx_path = td / f"{name}-{ratio}.onnx"
                export(model, recipe.inputs, ["logits"], ExportStage(), onnx_path)
                variants[ratio] = (onnx_path, macs)
            fp32_onnx, macs0 = variants[0.0]
            core = ov.Core()
            cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": THREADS}
            hand = nncf.quantize(ov.convert_model(str(fp32_onnx)), nncf.Dataset([{"image": x[None]} for x in calib]))
            compiled = {"OpenVINO fp32": core.compile_model(ov.convert_model(str(fp32_onnx)), "CPU", cfg),
                        "nncf.quantize defaults (by hand)": core.compile_model(hand, "CPU", cfg)}
            macs = {"OpenVINO fp32": macs0, "nncf.quantize defaults (by hand)": macs0}
            for ratio, (path, m) in variants.items():
                wd = td / f"build-{name}-{ratio}"
                wd.mkdir()
                ctx = BuildContext(recipe, spec, opts, path, Split({"image": calib}, None), Split({"image": calib}, None),
                                   wd, THREADS)
                built = target.build(ctx)
                label = "edgebundle openvino" + (f", pruned {int(ratio * 100)} %" if ratio else "")
                compiled[label] = core.compile_model(str(wd / built.model_file), "CPU", cfg)
                macs[label] = m
            ref = compiled["OpenVINO fp32"]({"image": probe})[0]
            cos = {k: cosine(c({"image": probe})[0], ref) for k, c in compiled.items()}
            reqs = {k: c.create_infer_request() for k, c in compiled.items()}
            timing = interleaved({k: (lambda r=r: r.infer({"image": probe})) for k, r in reqs.items()},
                                 threads=THREADS)
            hand_p50 = timing["nncf.quantize defaults (by hand)"]["p50_ms"]
            payload["models"][name] = {k: {**timing[k], "cosine_vs_fp32": cos[k], "macs": macs[k]} for k in compiled}
            for k in compiled:
                t = timing[k]
                c = f"{cos[k]:.4f}" if "pruned" not in k else "n/a (pruned, random weights)"
                rows.append(f"| {name} | {k} | {macs[k] / 1e9:.2f} | {t['p50_ms']:.2f} | "
                            f"{t['iqr_ms'][0]:.2f}–{t['iqr_ms'][1]:.2f} | {t['p50_ms'] / hand_p50:.2f}x | {c} |")
    md = ("| model | candidate | GMAC | p50 ms | IQR ms | vs nncf defaults | output cosine vs fp32 |\n"
          "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write("openvino_vs_nncf", payload, md)


if __name__ == "__main__":
    main()
