"""Groups: inputs of one source (crops of one photo, frames of one video, sentences of one document) stay in
one split, the verdict's interval resamples groups, and a student that only learned the sources it was
distilled on is judged on sources it never saw."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgebundle.core.data import load_dataset
from edgebundle.core.errors import DataError
from edgebundle.core.metrics import Contract, MetricSpec
from edgebundle.core.recipe import recipe_from_dict

TESTS = Path(__file__).resolve().parent
HAVE_PHOTOS = all(importlib.util.find_spec(m) is not None for m in ("skimage", "PIL", "matplotlib"))


def _function_recipe(tmp_path: Path, data: dict, **changes):
    d = {"version": 1, "name": "g", "model": {"factory": "crops.py:teacher"},
         "inputs": [{"name": "image", "shape": [1, 3, 24, 24], "dtype": "float32", "dynamic_axes": {0: "batch"}}],
         "outputs": ["logits"], "metric": {"name": "agreement", "min_confidence": 0.5},
         "data": {"kind": "function", "function": "crops.py:data", **data},
         "stages": {"train": {"enabled": False}, "prune": {"enabled": True, "ratio": 0.5},
                    "distill": {"enabled": True, "epochs": 30}},
         "targets": [{"name": "ort-cpu", "max_accuracy_drop": 10, "options": {"precision": "fp32"},
                      "measure": {"iterations": 10}}], **changes}
    shutil.copy(TESTS / "crops.py", tmp_path / "crops.py")
    return recipe_from_dict(d, base_dir=tmp_path)


def _split_groups(ds) -> list[set]:
    return [set(s.groups.tolist()) for s in (ds.train, ds.val, ds.test)]


@pytest.mark.skipif(not HAVE_PHOTOS, reason="scikit-image, Pillow and matplotlib ship the photos (edgebundle[real])")
def test_groups_from_a_data_function_keep_every_source_in_one_split(tmp_path):
    ds = load_dataset(_function_recipe(tmp_path, {"kwargs": {"n": 160}, "splits": {"train": 0.5, "val": 0.2,
                                                                                   "test": 0.3}}))
    train, val, test = _split_groups(ds)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 16 and ds.grouped == "the data function's 'group'"
    assert ds.splits["test"] == {"inputs": len(ds.test), "groups": len(test)}
    assert sum(ds.splits[s]["inputs"] for s in ("train", "val", "test")) == 160
    # without groups (the same crops): every input its own group, split at random as before
    flat = load_dataset(_function_recipe(tmp_path, {"kwargs": {"n": 160, "groups": False}}))
    assert flat.grouped is None and flat.test.groups is None and flat.splits["test"]["groups"] == len(flat.test)


def test_an_image_folder_of_n_files_yields_n_groups_and_video_folders_stay_whole(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "flat").mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    d = {"version": 1, "name": "img", "model": {"factory": "crops.py:teacher"},
         "inputs": [{"name": "image", "shape": [1, 3, 8, 8], "dtype": "float32"}], "outputs": ["logits"],
         "data": {"kind": "images", "path": "flat"}}
    ds = load_dataset(recipe_from_dict(d, base_dir=tmp_path))
    assert ds.grouped == "image file"
    assert sum(ds.splits[s]["groups"] for s in ("train", "val", "test")) == 30
    assert all(ds.splits[s]["groups"] == ds.splits[s]["inputs"] for s in ("train", "val", "test"))
    files = [set(s.groups.tolist()) for s in (ds.train, ds.val, ds.test)]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    # frames stored one folder per video: group_by folder keeps each video in one split, and the video folders
    # are groups, not classes
    for v in range(6):
        (tmp_path / "videos" / f"v{v}").mkdir(parents=True)
        for f in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                tmp_path / "videos" / f"v{v}" / f"{f}.png")
    d["data"] = {"kind": "images", "path": "videos", "group_by": "folder"}
    ds = load_dataset(recipe_from_dict(d, base_dir=tmp_path))
    assert ds.test.labels is None and ds.grouped == "image folder"
    videos = _split_groups(ds)
    assert not (videos[0] & videos[1]) and not (videos[0] & videos[2]) and not (videos[1] & videos[2])
    assert len(videos[0] | videos[1] | videos[2]) == 6
    d["data"] = {"kind": "images", "path": "videos"}  # without: 30 files, 30 groups, the folders are classes
    ds = load_dataset(recipe_from_dict(d, base_dir=tmp_path))
    assert ds.test.labels is not None and sum(ds.splits[s]["groups"] for s in ("train", "val", "test")) == 30


def test_text_documents_are_paragraphs_or_a_column(tmp_path):
    from edgebundle.core.recipe import TextSpec
    from edgebundle.core.sources import text_groups

    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n\nfour\nfive\n", encoding="utf-8")
    assert text_groups(tmp_path / "a.txt", TextSpec()).tolist() == ["0", "0", "1", "2", "2"]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "doc": "A"}\n{"text": "y", "doc": "B"}\n', encoding="utf-8")
    assert text_groups(tmp_path / "b.jsonl", TextSpec(document_column="doc")).tolist() == ["A", "B"]
    with pytest.raises(DataError, match="no column 'document'"):
        text_groups(tmp_path / "b.jsonl", TextSpec())


def test_the_interval_resamples_groups_and_widens_with_few_of_them():
    """150 confident inputs from 5 sources, 8 disagreements all in one source: Wilson on inputs says the
    agreement is surely above 89 %; resampling the 5 sources says it may be far lower."""
    rng = np.random.default_rng(0)
    ref = np.zeros((150, 4), np.float32)
    ref[np.arange(150), rng.integers(0, 4, 150)] = 10.0
    out = ref.copy()
    groups = np.repeat(np.arange(5), 30)
    flip = np.flatnonzero(groups == 2)[:8]
    out[flip] = np.roll(out[flip], 1, axis=1)
    c = Contract("agreement", MetricSpec(name="agreement"), 10.0)
    plain = c.judge(ref, out, None, interval=True)
    grouped = c.judge(ref, out, None, interval=True, groups=groups)
    assert plain.value == grouped.value and plain.groups is None and grouped.groups == 5
    assert grouped.interval[0] < plain.interval[0] - 3 and plain.interval[0] > 89
    assert "from 5 groups" in grouped.line()
    # every input its own group: the plain interval
    alone = c.judge(ref, out, None, interval=True, groups=np.arange(150))
    assert alone.interval == plain.interval and alone.groups is None


@pytest.mark.skipif(not HAVE_PHOTOS, reason="scikit-image, Pillow and matplotlib ship the photos (edgebundle[real])")
def test_fewer_than_three_groups_cannot_be_split(tmp_path):
    (tmp_path / "two.py").write_text(
        "import numpy as np\n"
        "def data():\n"
        "    yield {'image': np.zeros((20, 3, 24, 24), np.float32), 'group': np.arange(20) % 2}\n")
    r = _function_recipe(tmp_path, {})
    r = r.model_copy(update={"data": r.data.model_copy(update={"function": "two.py:data"})})
    with pytest.raises(DataError, match="2 group"):
        load_dataset(r)


@pytest.mark.skipif(not HAVE_PHOTOS, reason="scikit-image, Pillow and matplotlib ship the photos (edgebundle[real])")
def test_a_student_that_memorized_its_photos_is_rejected_when_judged_on_photos_it_never_saw(tmp_path):
    """Crops of 16 photo halves; a teacher that names every half; a student pruned to half its channels and
    distilled on the training crops. Split at random, the test crops come from the halves the student was
    distilled on and it agrees with the teacher within the 10-point budget: it would ship. Split by group, the
    test halves are ones it never saw: it is rejected, the line naming pruning + distillation. Without groups,
    the manifest says the verdict rests on inputs that may not be independent."""
    from edgebundle.pipeline.runner import run

    data = {"kwargs": {"n": 480}, "splits": {"train": 0.5, "val": 0.2, "test": 0.3}, "calibration_samples": 16}
    grouped = run(_function_recipe(tmp_path, data), output=tmp_path / "grouped", keep_rejected=True)
    (g,) = grouped.bundles
    acc = g.manifest["accuracy"]
    assert g.status == "rejected", acc
    rejection = g.manifest["target"]["rejection"]
    assert "pruning + distillation" in rejection and "groups" in rejection
    assert acc["groups"] == acc["splits"]["test"]["groups"] < 10 and acc["splits"]["grouped_by"]
    train, val, test = _split_groups(grouped.prepared.dataset)
    assert not (train & test) and not (val & test)
    assert any("independent groups" in n for n in g.manifest["notes"])

    flat = dict(data, kwargs={"n": 480, "groups": False})
    ungrouped = run(_function_recipe(tmp_path, flat), output=tmp_path / "flat", keep_rejected=True)
    (u,) = ungrouped.bundles
    assert u.status == "complete", u.manifest["target"]["rejection"]
    assert u.manifest["accuracy"]["groups"] is None
    assert any("treated as independent" in n for n in u.manifest["notes"])
    # the same student kind, the same crops: what a random split hides
    assert u.manifest["accuracy"]["target"] - acc["target"] > 30
