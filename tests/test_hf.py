"""A Hugging Face BERT from a local folder (never a download): heads pruned, distilled, int8 on CPU targets."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from edgebundle.core.errors import RecipeError
from edgebundle.core.recipe import load_recipe
from edgebundle.pipeline.runner import run
from edgebundle.targets import registry

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
    # the int8 step is under test here: judged against the fp32 student (6 distillation epochs leave this
    # random tiny BERT's student over a 1-point budget against its teacher; tests/test_reference.py covers that)
    recipe.update(model={"hf": "tiny-bert"}, output="out", metric={"name": "auto", "reference": "student"})
    recipe["stages"].update(train={"enabled": True, "epochs": 8, "lr": 0.002}, distill={"epochs": 6, "hidden_weight": 10.0})
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


def test_hf_tasks_give_their_outputs_and_a_task_the_class_lacks_is_one_line(tmp_path):
    import torch

    from edgebundle.core.hf import load

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
    transformers.BertForTokenClassification(cfg).save_pretrained(tmp_path / "bert")
    ids = torch.randint(3, 32, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.int64)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert load(tmp_path / "bert", "token-classification")(ids, mask).shape == (2, 10, 3)
        assert load(tmp_path / "bert", "sequence-classification")(ids, mask).shape == (2, 3)
        emb = load(tmp_path / "bert", "feature-extraction", normalize=True)(ids, mask)
        assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
        # mean pooling ignores padded tokens: changing them does not change the embedding
        ids2 = ids.clone()
        ids2[1, 6:] = 5
        torch.testing.assert_close(load(tmp_path / "bert", "feature-extraction")(ids2, mask)[1],
                                   load(tmp_path / "bert", "feature-extraction")(ids, mask)[1])
    with pytest.raises(RecipeError, match="has no image-classification head"):
        load(tmp_path / "bert", "image-classification")


def test_hf_only_fields_on_a_factory_model_are_refused():
    from pydantic import ValidationError

    from edgebundle.core.recipe import ModelSpec

    with pytest.raises(ValidationError, match="apply to model.hf only"):
        ModelSpec(factory="edgebundle.zoo:digits_cnn", task="feature-extraction")
    with pytest.raises(ValidationError, match="apply to task feature-extraction only"):
        ModelSpec(hf="x", normalize=True)


def test_a_text_file_feeds_a_hf_classifier_with_the_folders_own_tokenizer(tmp_path):
    """`data: {kind: text}` on a .txt of `text<TAB>label` lines, tokenized by the tokenizer saved in the
    model folder, trains and bundles a Hugging Face sequence classifier."""
    import torch

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "bad", "awful", "film", "movie",
             "a", "the", "very", "plot", "acting"]
    folder = tmp_path / "bert"
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                  num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(240):
        pos = i % 2 == 0
        filler = list(rng.choice(["a", "the", "very", "film", "movie", "plot", "acting"], size=4))
        filler.insert(int(rng.integers(0, 5)), str(rng.choice(["good", "great"] if pos else ["bad", "awful"])))
        lines.append(" ".join(filler) + ("\tpositive" if pos else "\tnegative"))
    (tmp_path / "reviews.txt").write_text("\n".join(lines) + "\n")
    recipe = {
        "version": 1, "name": "reviews", "model": {"hf": "bert"},
        "inputs": [{"name": "input_ids", "shape": [1, 12], "dtype": "int64", "dynamic_axes": {0: "batch"}},
                   {"name": "attention_mask", "shape": [1, 12], "dtype": "int64", "dynamic_axes": {0: "batch"}}],
        "outputs": ["logits"],
        "data": {"kind": "text", "path": "reviews.txt", "calibration_samples": 32},
        "stages": {"train": {"enabled": True, "epochs": 30, "lr": 0.003, "batch_size": 16}, "prune": {"enabled": False},
                   "distill": {"enabled": False}},
        "targets": [{"name": "ort-cpu", "measure": {"iterations": 10}, "max_accuracy_drop": 3.0,
                     "options": {"precision": "int8"}}],
        "output": "out",
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = run(load_recipe(tmp_path / "r.yaml"))
    assert res.prepared.dataset.classes == ("negative", "positive")
    assert res.prepared.teacher.metrics["test_accuracy"] >= 90.0
    b = res.bundles[0]
    assert b.status == "complete", b.reason
    assert b.manifest["accuracy"]["metric"] == "top1"


def test_bert_style_attention_exports_with_torchscript_so_ort_fuses_it(hf_run):
    """Hugging Face BERT attention goes through the TorchScript exporter (exporter: auto), whose graph ONNX
    Runtime's transformer optimizer fuses (this model has no attention-mask input, so its attention stays
    unfused; all-MiniLM-L6-v2 with its mask fuses all six: tests/test_real.py)."""
    from edgebundle import zoo
    from edgebundle.core.recipe import ExportStage
    from edgebundle.exporters.onnx import resolve_exporter

    export_art = next(a for a in hf_run.prepared.lineage if a.stage == "export")
    assert export_art.metrics["exporter"] == "torch.onnx.export(dynamo=False)"
    b = next(b for b in hf_run.bundles if b.target == "ort-cpu")
    assert b.manifest["target"]["runtime"]["transformer_fusions"].get("SkipLayerNormalization") == 4
    assert resolve_exporter(zoo.digits_cnn(), ExportStage()) == "dynamo"
    assert export_art.metrics["opset"] == 17


def _tiny_text_recipe(tmp_path, folder: str) -> Path:
    recipe = {
        "version": 1, "name": "t", "model": {"hf": folder},
        "inputs": [{"name": "input_ids", "shape": [1, 12], "dtype": "int64", "dynamic_axes": {0: "batch"}},
                   {"name": "attention_mask", "shape": [1, 12], "dtype": "int64", "dynamic_axes": {0: "batch"}}],
        "outputs": ["logits"],
        "data": {"kind": "text", "path": "reviews.txt", "calibration_samples": 16},
        "stages": {"train": {"enabled": True, "epochs": 1}, "prune": {"enabled": False},
                   "distill": {"enabled": False}},
        "targets": [{"name": "ort-cpu", "measure": {"iterations": 10}}],
        "output": "out",
    }
    lines = [f"{'good' if i % 2 else 'bad'} film number {i}\t{'pos' if i % 2 else 'neg'}" for i in range(120)]
    (tmp_path / "reviews.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "r.yaml"


def test_a_hf_folder_without_tokenizer_files_is_one_line_not_a_bundle_of_unknown_tokens(tmp_path):
    """config and weights but no tokenizer files: transformers would build an empty tokenizer that maps every
    word to [UNK], and the model would be trained and judged on near-constant inputs. One line, exit 2."""
    from typer.testing import CliRunner

    from edgebundle.cli import app

    cfg = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    res = CliRunner().invoke(app, ["run", str(_tiny_text_recipe(tmp_path, "bert"))])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert "no tokenizer in" in line and "vocabulary files" in line and "Traceback" not in res.output
    assert not (tmp_path / "out" / "ort-cpu").exists()


def test_a_tokenizer_that_maps_most_words_to_unknown_is_refused(tmp_path):
    """A real vocabulary file, but foreign to the data: most of its words become [UNK]. Refused, exit 2."""
    from typer.testing import CliRunner

    from edgebundle.cli import app

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "gut", "schlecht", "und"]
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "bert")
    res = CliRunner().invoke(app, ["run", str(_tiny_text_recipe(tmp_path, "bert"))])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert "maps 100% of the data's tokens to its unknown token '[UNK]'" in line, line


def test_pickled_weights_in_a_hf_folder_are_one_line_exit_2_and_run_nothing(tmp_path):
    """pytorch_model.bin holding a __reduce__ payload: torch refuses to unpickle it (weights_only), nothing
    runs, and the run says so in the line model.weights gives, exit 2."""
    import os

    import torch
    from typer.testing import CliRunner

    from edgebundle.cli import app

    cfg = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "model.safetensors").unlink()
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, tmp_path / "bert" / "pytorch_model.bin")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "number"]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "bert")
    res = CliRunner().invoke(app, ["run", str(_tiny_text_recipe(tmp_path, "bert"))])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert "cannot be loaded safely: it holds pickled Python objects" in line and "weights_only=False" not in line
    assert not marker.exists()
