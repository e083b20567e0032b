"""Which ORT int8 format and types reach ONNX Runtime's fast CPU kernels on this machine?

ResNet-18 and MobileNetV2 at 1x3x224x224 (random weights, BatchNorm statistics from random data),
exported with edgebundle's exporter, quantized with `quantize_static` (per-channel weights, 32 random
calibration samples) in four ways, and timed interleaved in one process at 2 threads, batch 1.

    python -m bench.ort_formats            # writes bench/results/ort_formats.{json,md}
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import interleaved, write
from edgebundle.exporters.onnx import cosine, export
from edgebundle.core.recipe import ExportStage, InputSpec
from edgebundle.targets.ort_cpu import OrtSession
from edgebundle import zoo

CONFIGS = {  # name -> (format, activations, weights)
    "fp32": None,
    "QDQ u8 act / s8 wt": ("qdq", "uint8", "int8"),
    "QDQ s8 act / s8 wt": ("qdq", "int8", "int8"),
    "QOperator u8 act / s8 wt": ("qoperator", "uint8", "int8"),
    "QOperator s8 act / s8 wt": ("qoperator", "int8", "int8"),
}
THREADS = 2


def quantize(src: Path, dst: Path, fmt: str, act: str, wt: str, calib: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x}

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    t = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    quantize_static(str(pre), str(dst), Reader(), per_channel=True, activation_type=t[act], weight_type=t[wt],
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator)


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(32)]
    probe = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(8)]
    spec = [InputSpec(name="image", shape=[1, 3, 224, 224])]
    payload, rows = {"models": {}}, []
    with tempfile.TemporaryDirectory() as td:
        for name, factory in (("ResNet-18", zoo.resnet18), ("MobileNetV2", zoo.mobilenet_v2)):
            model = zoo.set_bn_stats_from_data(factory())
            fp32 = Path(td) / f"{name}.onnx"
            export(model, spec, ["logits"], ExportStage(), fp32)
            sessions, cos = {}, {}
            ref = [OrtSession(fp32, threads=THREADS).run({"image": x})[0] for x in probe]
            for cfg, q in CONFIGS.items():
                path = fp32 if q is None else Path(td) / f"{name}-{cfg.replace(' ', '_').replace('/', '')}.onnx"
                if q is not None:
                    quantize(fp32, path, *q, calib)
                s = OrtSession(path, threads=THREADS)
                sessions[cfg] = s
                cos[cfg] = float(np.mean([cosine(s.run({"image": x})[0], r) for x, r in zip(probe, ref)]))
            x0 = {"image": probe[0]}
            timing = interleaved({k: (lambda s=s: s.run(x0)) for k, s in sessions.items()}, threads=THREADS)
            payload["models"][name] = {k: {**timing[k], "cosine_vs_fp32": cos[k]} for k in CONFIGS}
            base = timing["fp32"]["p50_ms"]
            for k in CONFIGS:
                t = timing[k]
                rows.append(f"| {name} | {k} | {t['p50_ms']:.2f} | {t['iqr_ms'][0]:.2f}–{t['iqr_ms'][1]:.2f} | "
                            f"{base / t['p50_ms']:.2f}x | {cos[k]:.4f} |")
    md = ("| model | ORT config (per-channel weights) | p50 ms | IQR ms | speedup vs ORT fp32 | output cosine vs fp32 |\n"
          "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write("ort_formats", payload, md)


if __name__ == "__main__":
    main()
