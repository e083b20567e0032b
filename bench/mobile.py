"""ExecuTorch fp32 / int8 (XNNPACK) next to PyTorch eager and ONNX Runtime, on this host (x86, not a phone).

ResNet-18 and MobileNetV2 at 1x3x224x224 (random weights, BatchNorm statistics from random data), the
`.pte` programs made by the `executorch` target's own lowering (`_lower`) and PT2E int8 with 32 random
calibration samples; everything timed in alternating rounds in one process, batch 1, 2 threads.

    python -m bench.mobile            # writes bench/results/mobile.{json,md}
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import interleaved, write
from edgebundle import zoo
from edgebundle.exporters.onnx import cosine, export
from edgebundle.core.recipe import ExportStage, InputSpec
from edgebundle.targets.executorch_xnnpack import ExecutorchSession, _lower
from edgebundle.targets.ort_cpu import OrtSession

THREADS = 2


def pte(model, example, calib, out: Path, int8: bool) -> dict:
    ep = torch.export.export(model, (example,))
    if int8:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer, get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        m = prepare_pt2e(ep.module(), q)
        with torch.no_grad():
            for x in calib:
                m(x)
        ep = torch.export.export(convert_pt2e(m), (example,))
    return _lower(ep, out)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    calib = [torch.from_numpy(rng.standard_normal((1, 3, 224, 224)).astype(np.float32)) for _ in range(32)]
    x = torch.from_numpy(rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
    spec = [InputSpec(name="image", shape=[1, 3, 224, 224])]
    payload, rows = {"models": {}}, []
    with tempfile.TemporaryDirectory() as td:
        for name, factory in (("ResNet-18", zoo.resnet18), ("MobileNetV2", zoo.mobilenet_v2)):
            model = zoo.set_bn_stats_from_data(factory()).eval()
            with torch.no_grad():
                ref = model(x).numpy()
            onnx_path = Path(td) / f"{name}.onnx"
            export(model, spec, ["logits"], ExportStage(), onnx_path)
            sessions = {"ORT fp32": OrtSession(onnx_path, threads=THREADS)}
            delegation, sizes = {}, {"ORT fp32": onnx_path.stat().st_size}
            for label, int8 in (("ExecuTorch fp32 (XNNPACK)", False), ("ExecuTorch int8 (XNNPACK)", True)):
                p = Path(td) / f"{name}-{int8}.pte"
                delegation[label] = pte(model, x, calib, p, int8)
                sessions[label] = ExecutorchSession(p, ["image"])
                sizes[label] = p.stat().st_size
            feeds = {"image": x.numpy()}
            cos = {k: cosine(s.run(feeds)[0], ref) for k, s in sessions.items()}

            def eager():
                with torch.inference_mode():
                    model(x)

            fns = {"PyTorch fp32 eager": eager, **{k: (lambda s=s: s.run(feeds)) for k, s in sessions.items()}}
            timing = interleaved(fns, threads=THREADS)
            base = timing["PyTorch fp32 eager"]["p50_ms"]
            payload["models"][name] = {k: {**timing[k], "cosine_vs_pytorch": cos.get(k, 1.0),
                                           "bytes": sizes.get(k), "delegation": delegation.get(k)} for k in fns}
            for k in fns:
                t = timing[k]
                d = delegation.get(k)
                frac = "-" if d is None else f"{d['delegated_fraction']:.0%}"
                size = "-" if k not in sizes else f"{sizes[k] / 2**20:.1f}"
                rows.append(f"| {name} | {k} | {t['p50_ms']:.2f} | {t['iqr_ms'][0]:.2f}–{t['iqr_ms'][1]:.2f} | "
                            f"{base / t['p50_ms']:.2f}x | {cos.get(k, 1.0):.4f} | {size} | {frac} |")
    md = ("| model | runtime | p50 ms | IQR ms | speedup vs PyTorch eager | output cosine vs PyTorch | MiB | "
          "XNNPACK-delegated |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write("mobile", payload, md)


if __name__ == "__main__":
    main()
