"""SmoothQuant on the ONNX graph (calibration/smooth.py): exact in fp32, and it takes the outlier channels
that ruin dynamic int8 out of the activations. On real weights and text, bench.real shows what it buys on
all-MiniLM-L6-v2 (tests/test_real.py runs a slice)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgebundle.calibration.smooth import smooth
from edgebundle.core.data import Split, run_split
from edgebundle.core.metrics import per_sample_cosine
from edgebundle.core.recipe import ExportStage, InputSpec
from edgebundle.core.session import OrtSession
from edgebundle.exporters.onnx import export


class Block(nn.Module):
    """LayerNorm -> MLP, with the few huge LayerNorm gains that give BERT its activation outliers."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)
        with torch.no_grad():
            self.norm.weight[[3, 17]] = 40.0

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(self.norm(x))))


def test_smoothing_is_exact_in_fp32_and_cuts_the_dynamic_int8_error(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    spec = [InputSpec(name="x", shape=[1, 16, 64], dtype="float32", dynamic_axes={0: "batch"})]
    src = tmp_path / "fp32.onnx"
    export(Block().eval(), spec, ["y"], ExportStage(), src)
    rng = np.random.default_rng(0)
    cal = Split({"x": rng.standard_normal((32, 16, 64)).astype(np.float32)}, None)
    test = Split({"x": rng.standard_normal((64, 16, 64)).astype(np.float32)}, None)
    info = smooth(src, tmp_path / "smoothed.onnx", cal, spec, alpha=0.8)
    assert info["matmuls"] == 2 and info["groups"] == 2

    def outputs(path):
        with OrtSession(path, threads=2) as s:
            return run_split(s, test, spec)

    ref = outputs(src)
    np.testing.assert_allclose(outputs(tmp_path / "smoothed.onnx"), ref, atol=1e-4, rtol=1e-4)
    errs = {}
    for name in ("fp32", "smoothed"):
        q = tmp_path / f"{name}.int8.onnx"
        quantize_dynamic(str(tmp_path / f"{name}.onnx"), str(q), per_channel=True, weight_type=QuantType.QInt8)
        errs[name] = float(1.0 - per_sample_cosine(outputs(q), ref).min())
    assert errs["smoothed"] < 0.5 * errs["fp32"], errs
