"""Does calibration memory stay bounded as the number of calibration samples grows?

ResNet-18 at 1x3x96x96 (random weights), `onnxruntime.quantization.quantize_static` as the `ort-cpu`
target calls it, each configuration in a fresh subprocess, peak RSS (ru_maxrss) for 32 and 512 samples:

- minmax and entropy as edgebundle runs them (`CalibStridedMinMax`: ranges / histograms merged after
  every stride of <= 16 samples)
- the same with ORT's defaults (every intermediate output of every sample held until the end)

    python -m bench.calib_memory        # writes bench/results/calib_memory.{json,md}
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write

CHILD = r"""
import json, resource, sys, numpy as np
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from edgebundle.calibration.readers import SplitReader
from edgebundle.core.data import Split
from edgebundle.core.recipe import CalibrationSpec, InputSpec
from edgebundle.targets.common import calibration_extra_options
src, dst, n, method, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
x = np.random.default_rng(0).standard_normal((n, 3, 96, 96)).astype(np.float32)
reader = SplitReader(Split({"image": x}, None), [InputSpec(name="image", shape=[1, 3, 96, 96])])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
extra = calibration_extra_options(CalibrationSpec(method=method), len(reader)) if mode == "edgebundle" else {}
m = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[method]
quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=m, extra_options=extra)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_calibration_mib": base / 1024}))
"""


def main() -> None:
    import torch

    from edgebundle import zoo
    from edgebundle.exporters.onnx import export
    from edgebundle.core.recipe import ExportStage, InputSpec
    from edgebundle.targets.common import CALIB_CHUNK

    configs = {f"minmax, edgebundle (strides of <= {CALIB_CHUNK})": ("minmax", "edgebundle"),
               "minmax, ORT default": ("minmax", "default"),
               f"entropy, edgebundle (strides of <= {CALIB_CHUNK})": ("entropy", "edgebundle"),
               "entropy, ORT default": ("entropy", "default")}
    payload, rows = {"configs": {}}, []
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "r18.onnx"
        torch.manual_seed(0)
        export(zoo.set_bn_stats_from_data(zoo.resnet18(), shape=(3, 96, 96)),
               [InputSpec(name="image", shape=[1, 3, 96, 96])], ["logits"], ExportStage(), src)
        for label, (method, mode) in configs.items():
            res = {}
            for n in (32, 512):
                out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(td) / "q.onnx"), str(n), method,
                                      mode], capture_output=True, text=True, timeout=1800)
                if out.returncode:
                    raise SystemExit(out.stderr[-2000:])
                res[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
            payload["configs"][label] = res
            rows.append(f"| {label} | {res[32]:.0f} | {res[512]:.0f} | {res[512] / res[32]:.2f}x |")
    md = ("ResNet-18 at 1x3x96x96, `quantize_static`, peak RSS of a fresh process.\n\n"
          "| calibration | peak RSS, 32 samples (MiB) | 512 samples (MiB) | growth |\n|---|---|---|---|\n"
          + "\n".join(rows) + "\n")
    write("calib_memory", payload, md)


if __name__ == "__main__":
    main()
