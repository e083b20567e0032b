"""A BERT-like encoder end to end: dynamic batch and sequence axes, int8 on every CPU target."""

import numpy as np
import pytest

from edgebundle.pipeline.recipe import load_recipe
from edgebundle.pipeline.runner import run
from edgebundle.targets import registry


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    return run(load_recipe("examples/encoder.yaml"), output=tmp_path_factory.mktemp("enc") / "out")


def test_encoder_learns_the_task(encoder_run):
    assert encoder_run.prepared.teacher.metrics["test_accuracy"] >= 90.0


@pytest.mark.parametrize("target", ["ort-cpu", "openvino"])
def test_int8_encoder_keeps_outputs_and_accuracy(encoder_run, target):
    m = next(b.manifest for b in encoder_run.bundles if b.target == target)
    acc = m["accuracy"]
    assert acc["output_cosine_vs_fp32"] >= 0.99
    assert abs(acc["target"] - acc["fp32_onnx"]) <= 1.0
    assert m["inputs"] == [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64"}]


@pytest.mark.parametrize("target", ["ort-cpu", "openvino"])
def test_variable_sequence_lengths_after_export(encoder_run, target):
    b = next(b for b in encoder_run.bundles if b.target == target)
    sess = registry.lookup(target).factory().open(b.path / b.manifest["model_file"], threads=2,
                                                   runtime=b.manifest["target"]["runtime"])
    rng = np.random.default_rng(0)
    try:
        for batch, seq in ((1, 8), (3, 32), (2, 128)):
            out = sess.run({"input_ids": rng.integers(3, 32, size=(batch, seq)).astype(np.int64)})[0]
            assert out.shape == (batch, 2) and np.isfinite(out).all()
    finally:
        sess.close()
