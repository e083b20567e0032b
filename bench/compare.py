"""edgebundle against what a competent engineer does by hand, in one process, same input, 2 threads.

For ResNet-18 and MobileNetV2 at 1x3x224x224 (random weights, BatchNorm statistics from random data), and
the BERT-like encoder in BERT-mini's shape (4 layers, hidden 256, 4 heads, MLP 1024, vocabulary 30522) at
sequence length 128 (random weights, random token ids):

- PyTorch fp32 eager; ONNX Runtime fp32; OpenVINO fp32 (LATENCY hint)
- ORT int8 **by hand**: `quant_pre_process` + `quantize_static`, QDQ, per-channel, QInt8 activations and
  weights, 32 calibration samples
- OpenVINO int8 **by hand**: `nncf.quantize` with its defaults, 32 samples
- edgebundle's `ort-cpu` (accuracy control off: with random weights and no labels its budget would be
  judged on output cosine alone) and `openvino` targets on the same model, unpruned and after Torch-Pruning at
  30 % and 50 % of channels (the encoder: that share of hidden/MLP channels and of attention heads, whole
  heads); random weights, so pruned rows are latency only

Columns: p50 with IQR, output cosine vs PyTorch, artifact size, the wall time of the tool's own step
(quantization / target build) next to the hand path's, and a physical-limit column: the model's MACs over
this host's int8 multiply-accumulate rate, measured (bench.common.int8_peak: ORT's MatMulInteger on large
GEMMs, the best of many runs), i.e. the fastest the arithmetic alone could run on the int8 kernels here.

    python -m bench.compare       # writes bench/results/compare.{json,md}; about 5 minutes on 2 cores
    python -m bench.compare bert  # only the models whose name contains "bert": compare-only.{json,md}
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import hand as hand_paths
from bench.common import int8_peak, interleaved, write
from edgebundle import zoo
from edgebundle.exporters.onnx import cosine, export
from edgebundle.core.data import Split
from edgebundle.stages.pruning import count, prune
from edgebundle.core.recipe import ExportStage, PruneStage, TargetSpec, recipe_from_dict
from edgebundle.targets import registry
from edgebundle.targets import BuildContext
from edgebundle.targets.ort_cpu import OrtSession

THREADS = 2


IMAGE = {"name": "image", "shape": [1, 3, 224, 224]}
TOKENS = {"name": "input_ids", "shape": [1, 128], "dtype": "int64", "dynamic_axes": {0: "batch", 1: "seq"}}
MODELS = (("ResNet-18", "resnet18", IMAGE), ("MobileNetV2", "mobilenet_v2", IMAGE),
          ("BERT-mini encoder, seq 128", "bert_mini", TOKENS))


def _data(spec: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec["name"] == "input_ids":
        return rng.integers(3, 30522, size=(n, *spec["shape"][1:])).astype(np.int64)
    return rng.standard_normal((n, *spec["shape"][1:])).astype(np.float32)


def main(only: list[str]) -> None:
    import nncf
    import openvino as ov

    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    peak, peak_how = int8_peak(THREADS)
    payload, rows = {"peak_int8_macs_per_s": peak, "peak_how": peak_how, "models": {}}, []
    ort_t, ov_t = registry.lookup("ort-cpu"), registry.lookup("openvino")
    core = ov.Core()
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": THREADS}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        for name, factory, ispec in MODELS:
            if only and not any(o.lower() in name.lower() for o in only):
                continue
            recipe = recipe_from_dict({"model": {"factory": f"edgebundle.zoo:{factory}"}, "inputs": [ispec]})
            iname, cnn, slug = ispec["name"], ispec["name"] == "image", factory
            calib, probe = _data(ispec, 32, rng), _data(ispec, 1, rng)
            feeds = {iname: probe}
            ex = (torch.from_numpy(probe),)
            fns, cos, size, macs, step_s = {}, {}, {}, {}, {}
            ref = None
            for ratio in (0.0, 0.3, 0.5):
                torch.manual_seed(0)
                model = getattr(zoo, factory)().eval()
                model = zoo.set_bn_stats_from_data(model) if cnn else model
                m_macs = count(model, ex)[0]
                if ratio:
                    cfg_p = PruneStage(ratio=ratio, head_ratio=0.0 if cnn else ratio)
                    m_macs = prune(model, cfg_p, ex, train=None, names=[iname]).macs_after
                    model = zoo.set_bn_stats_from_data(model) if cnn else model.eval()
                fp32 = td / f"{slug}-{ratio}.onnx"
                export(model, recipe.inputs, ["logits"], ExportStage(), fp32)
                if not ratio:
                    with torch.no_grad():
                        ref = model(torch.from_numpy(probe)).numpy()

                    def eager(model=model):
                        with torch.inference_mode():
                            model(torch.from_numpy(probe))

                    fns["PyTorch fp32 eager"], macs["PyTorch fp32 eager"] = eager, m_macs
                    s = OrtSession(fp32, threads=THREADS)
                    fns["ORT fp32"], macs["ORT fp32"], size["ORT fp32"] = (lambda s=s: s.run(feeds)), m_macs, fp32.stat().st_size
                    hand = td / f"{slug}-hand.onnx"
                    t0 = time.perf_counter()
                    hand_paths.ort_static(fp32, hand, [{iname: x[None]} for x in calib], activations="s8")
                    step_s["ORT int8 by hand"] = time.perf_counter() - t0
                    s = OrtSession(hand, threads=THREADS)
                    fns["ORT int8 by hand"], macs["ORT int8 by hand"], size["ORT int8 by hand"] = (lambda s=s: s.run(feeds)), m_macs, hand.stat().st_size
                    # each lambda holds its request and then its compiled model: the request never outlives it
                    cm = core.compile_model(ov.convert_model(str(fp32)), "CPU", cfg)
                    c = cm.create_infer_request()
                    fns["OpenVINO fp32"], macs["OpenVINO fp32"] = (lambda c=c, cm=cm: c.infer(feeds)), m_macs
                    t0 = time.perf_counter()
                    q = nncf.quantize(ov.convert_model(str(fp32)), nncf.Dataset([{iname: x[None]} for x in calib]))
                    step_s["OpenVINO int8 by hand (nncf defaults)"] = time.perf_counter() - t0
                    cm = core.compile_model(q, "CPU", cfg)
                    c = cm.create_infer_request()
                    fns["OpenVINO int8 by hand (nncf defaults)"] = lambda c=c, cm=cm: c.infer(feeds)
                    macs["OpenVINO int8 by hand (nncf defaults)"] = m_macs
                for tname, entry in (("ort-cpu", ort_t), ("openvino", ov_t)):
                    wd = td / f"{slug}-{ratio}-{tname}"
                    wd.mkdir()
                    spec = TargetSpec(name=tname, calibration={"samples": 32})
                    # random weights, no labels: the budget would be judged on output cosine alone, and on
                    # MobileNetV2 (cosine 0.977) accuracy control keeps most layers float to reach 0.99;
                    # off here, so every int8 row is plain int8 at the same 32 samples
                    opts = {"accuracy_control": False} if tname == "ort-cpu" else {}
                    ctx = BuildContext(recipe, spec, entry.options_model.model_validate(opts), fp32,
                                       Split({iname: calib}, None), Split({iname: calib}, None), wd, THREADS)
                    target = entry.factory()
                    t0 = time.perf_counter()
                    built = target.build(ctx)
                    label = f"edgebundle {tname}" + (f", pruned {int(ratio * 100)} %" if ratio else "")
                    step_s[label] = time.perf_counter() - t0
                    sess = target.open(wd / built.model_file, threads=THREADS, runtime=built.runtime)
                    fns[label], macs[label] = (lambda s=sess: s.run(feeds)), m_macs
                    size[label] = sum((wd / f).stat().st_size for f in built.files)
            for k, fn in fns.items():
                if "pruned" in k:
                    continue
                out = fn()
                if k == "PyTorch fp32 eager":
                    continue
                arr = out[0] if isinstance(out, list) else next(iter(out.values()))
                cos[k] = cosine(np.asarray(arr), ref)
            timing = interleaved(fns, threads=THREADS)
            eager_p50 = timing["PyTorch fp32 eager"]["p50_ms"]
            hand_ort = timing["ORT int8 by hand"]["p50_ms"]
            hand_ov = timing["OpenVINO int8 by hand (nncf defaults)"]["p50_ms"]
            payload["models"][name] = {k: {**timing[k], "macs": macs[k], "cosine_vs_pytorch": cos.get(k),
                                           "bytes": size.get(k), "step_seconds": step_s.get(k)} for k in fns}
            for k in fns:
                t = timing[k]
                limit_ms = macs[k] / peak * 1e3
                vs_hand = (f"{t['p50_ms'] / hand_ort:.2f}x ORT-hand" if "ort-cpu" in k else
                           f"{t['p50_ms'] / hand_ov:.2f}x nncf-hand" if "openvino" in k else "")
                c = "pruned: n/a" if "pruned" in k else ("1.0000" if k not in cos else f"{cos[k]:.4f}")
                rows.append(
                    f"| {name} | {k} | {macs[k] / 1e9:.2f} | {t['p50_ms']:.2f} | {t['iqr_ms'][0]:.2f}–{t['iqr_ms'][1]:.2f} "
                    f"| {eager_p50 / t['p50_ms']:.2f}x | {vs_hand} | {c} | "
                    f"{'-' if k not in size else f'{size[k] / 2**20:.1f}'} | "
                    f"{'-' if k not in step_s else f'{step_s[k]:.1f}'} | {limit_ms:.2f} ({limit_ms / t['p50_ms']:.0%}) |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    payload["peak_rss_mib"] = rss
    payload["wall_seconds"] = wall = time.perf_counter() - started
    md = (f"Int8 limit: MACs / the measured int8 peak of this host, {peak / 1e9:.0f} G MAC/s ({peak_how}); the "
          "column gives that time and "
          f"what fraction of the measured p50 it is. Peak RSS of the whole benchmark process: {rss:.0f} MiB; "
          f"whole run {wall / 60:.1f} minutes.\n\n"
          "| model | candidate | GMAC | p50 ms | IQR ms | speedup vs PyTorch eager | vs hand path | cosine vs "
          "PyTorch | MiB | tool step s | int8 limit ms (share of p50) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
          + "\n".join(rows) + "\n")
    write("compare-only" if only else "compare", payload, md)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
