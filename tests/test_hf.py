"""A Hugging Face BERT from a local folder (never a download): heads pruned, distilled, int8 on CPU targets."""

import numpy as np
import pytest
import yaml

from edgebundle.core.errors import RecipeError
from edgebundle.core.recipe import load_recipe
from edgebundle.pipeline.runner import run
from edgebundle.core import registry

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed (pip install edgebundle[hf])")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(root / "tiny-bert")
    recipe = yaml.safe_load(open("examples/encoder.yaml"))
    recipe.update(model={"hf": "tiny-bert"}, output="out")
    recipe["stages"].update(train={"epochs": 8, "lr": 0.002}, distill={"epochs": 6, "hidden_weight": 10.0})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run(load_recipe(root / "recipe.yaml"))


def test_hf_encoder_is_pruned_by_whole_heads(hf_run):
    stages = {a.stage: a.metrics for a in hf_run.prepared.lineage}
    assert hf_run.prepared.teacher.metrics["test_accuracy"] >= 90.0
    heads = stages["prune"]["heads"]
    assert sorted(heads) == [f"model.bert.encoder.layer.{i}.attention.self" for i in (0, 1)]
    assert all(v == [4, 2] for v in heads.values())
    assert stages["prune"]["macs_ratio"] < 0.6


@pytest.mark.parametrize("target", ["ort-cpu", "openvino"])
def test_hf_encoder_int8_keeps_outputs_and_accuracy(hf_run, target):
    b = next(b for b in hf_run.bundles if b.target == target)
    acc = b.manifest["accuracy"]
    assert acc["output_cosine_vs_fp32"] >= 0.99 and abs(acc["target"] - acc["fp32_onnx"]) <= 1.0
    sess = registry.lookup(target).factory().open(b.path / b.manifest["model_file"], threads=2,
                                                   runtime=b.manifest["target"]["runtime"])
    try:
        for batch, seq in ((1, 8), (2, 100)):
            ids = np.random.default_rng(0).integers(3, 32, size=(batch, seq)).astype(np.int64)
            assert sess.run({"input_ids": ids})[0].shape == (batch, 2)
    finally:
        sess.close()


def test_hf_folder_without_config_is_one_clear_error(tmp_path):
    from edgebundle.core.hf import sequence_classifier

    with pytest.raises(RecipeError, match="no config.json"):
        sequence_classifier(tmp_path)


def test_hf_and_factory_are_exclusive(tmp_path):
    recipe = yaml.safe_load(open("examples/encoder.yaml"))
    recipe["model"] = {"hf": "x", "factory": "edgebundle.zoo:tiny_encoder"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="exactly one of model.factory and model.hf"):
        load_recipe(tmp_path / "r.yaml")
