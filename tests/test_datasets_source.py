"""data.kind datasets: a Hugging Face `datasets` folder written by save_to_disk, as users keep their data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import default_dict
from edgebundle.cli import app
from edgebundle.core.recipe import DatasetsSpec, ImageSpec, InputSpec

datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed (pip install "
                                                  "edgebundle[datasets])")
cli = CliRunner()


def _digits_folder(root):
    """scikit-learn's digits as a DatasetDict (train/test) with a ClassLabel label column."""
    from sklearn.datasets import load_digits

    d = load_digits()
    names = [f"digit{i}" for i in range(10)]
    features = datasets.Features({"pixels": datasets.Array3D(shape=(1, 8, 8), dtype="float32"),
                                  "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"pixels": (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8).tolist(),
                                     "label": d.target.tolist()}, features=features)
    datasets.DatasetDict({"train": ds.select(range(1500)), "test": ds.select(range(1500, len(ds)))}
                         ).save_to_disk(str(root))
    return root


def test_columns_and_class_labels_from_a_dataset_dict(tmp_path):
    from edgebundle.core.sources import read_datasets

    folder = _digits_folder(tmp_path / "digits")
    spec = DatasetsSpec(columns={"x": "pixels"}, label_column="label")
    inp = [InputSpec(name="x", shape=[1, 1, 8, 8])]
    x, y, classes = read_datasets(folder, spec, inp, image=ImageSpec(), tokenizer_folder=None, hf_folder=None)
    assert x["x"].shape == (1500, 1, 8, 8) and x["x"].dtype == np.float32 and len(y) == 1500  # 'train' by default
    assert classes == [f"digit{i}" for i in range(10)] and set(y.tolist()) == set(range(10))
    _, y2, _ = read_datasets(folder, spec.model_copy(update={"split": "test"}), inp, image=ImageSpec(),
                             tokenizer_folder=None, hf_folder=None)
    assert len(y2) == 297


def test_an_image_column_is_decoded_lazily_like_an_image_folder(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from edgebundle.core.sources import read_datasets, read_images

    china, flower = load_sample_images().images
    crops = [china[:200, :300], flower[100:300, 50:250], china[50:250, 200:400]]
    (tmp_path / "imgs").mkdir()
    for i, c in enumerate(crops):
        Image.fromarray(np.ascontiguousarray(c)).save(tmp_path / "imgs" / f"{i}.png")
    ds = datasets.Dataset.from_dict({"img": [str(tmp_path / "imgs" / f"{i}.png") for i in range(3)],
                                     "label": [0, 1, 0]})
    ds.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    spec, inp = ImageSpec(resize=80, mean=[0.5] * 3, std=[0.25] * 3), InputSpec(name="image", shape=[1, 3, 64, 64])
    x, y, classes = read_datasets(tmp_path / "ds", DatasetsSpec(image_column="img", label_column="label"), [inp],
                                  image=spec, tokenizer_folder=None, hf_folder=None)
    lazy = x["image"]
    assert lazy.shape == (3, 3, 64, 64) and y.tolist() == [0, 1, 0] and classes == []
    from_folder, _, _ = read_images(tmp_path / "imgs", spec, inp)  # the same files, the same preprocessing
    np.testing.assert_allclose(np.asarray(lazy), np.asarray(from_folder), atol=1e-6)
    np.testing.assert_allclose(lazy[2], np.asarray(from_folder)[2], atol=1e-6)


def test_a_text_column_is_tokenized_with_the_folder_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from edgebundle.core.sources import read_datasets

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "tok")
    datasets.Dataset.from_dict({"sentence": ["good movie", "bad movie", "good"], "label": ["pos", "neg", "pos"]}
                               ).save_to_disk(str(tmp_path / "ds"))
    inputs = [InputSpec(name="input_ids", shape=[1, 6], dtype="int64"),
              InputSpec(name="attention_mask", shape=[1, 6], dtype="int64")]
    x, y, classes = read_datasets(tmp_path / "ds", DatasetsSpec(text_column="sentence", label_column="label"),
                                  inputs, image=ImageSpec(), tokenizer_folder=tmp_path / "tok", hf_folder=None)
    assert x["input_ids"][0].tolist() == [2, 5, 7, 3, 0, 0] and x["attention_mask"][2].tolist() == [1, 1, 1, 0, 0, 0]
    assert classes == ["neg", "pos"] and y.tolist() == [1, 0, 1]


def test_a_datasets_folder_feeds_a_whole_run_and_bad_ones_are_one_line(tmp_path):
    _digits_folder(tmp_path / "digits")
    d = default_dict()
    d["data"] = {"kind": "datasets", "path": "digits", "calibration_samples": 16,
                 "datasets": {"columns": {d["inputs"][0]["name"]: "pixels"}, "label_column": "label"}}
    d["stages"] = {"train": {"epochs": 2}, "prune": {"enabled": False}, "distill": {"enabled": False}}
    d["targets"] = [{"name": "ort-cpu", "measure": {"iterations": 10}, "max_accuracy_drop": 100.0,
                     "options": {"precision": "fp32"}}]  # the source is under test here, not int8
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    data_art = next(p for p in (tmp_path / "out" / ".work").iterdir() if p.name.startswith("data-"))
    assert json.loads((data_art / "artifact.json").read_text())["metrics"]["classes"] == [f"digit{i}" for i in range(10)]

    (tmp_path / "plain").mkdir()
    cases = [({"path": "nowhere"}, "datasets folder not found"),
             ({"path": "plain"}, "is not a folder written by datasets' save_to_disk"),
             ({"datasets": {"columns": {d["inputs"][0]["name"]: "pixel"}}}, "no column 'pixel' (columns: pixels, label)"),
             ({"datasets": {"columns": {d["inputs"][0]["name"]: "pixels"}, "split": "validation"}},
              "has splits train, test: no split 'validation'"),
             ({"datasets": {"image_column": "label"}}, "column 'label' holds ClassLabel, not images")]
    for change, want in cases:
        dd = json.loads(json.dumps(d))
        dd["data"].update(change)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(dd))
        res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out2")])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and want in lines[0], (change, res.output)
