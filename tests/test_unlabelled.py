"""Label-free distillation with more data: `data.unlabelled` (inputs distillation and the structure search learn
from, a share of its groups held out as an out-of-distribution check) and `distill.augment` (a new view of
each input every epoch, the teacher answering that view)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgebundle.core.data import load_dataset
from edgebundle.core.errors import RecipeError
from edgebundle.core.recipe import InputSpec, recipe_from_dict
from edgebundle.stages.augment import augmenter

try:
    import matplotlib  # noqa: F401
    import skimage  # noqa: F401
    from PIL import Image  # noqa: F401

    HAVE_PHOTOS = True
except ImportError:
    HAVE_PHOTOS = False


def test_image_views_are_new_crops_of_the_same_size_and_repeat_with_the_seed():
    aug = augmenter([InputSpec(name="image", shape=[1, 3, 32, 32])])
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32) / 1000
    a = aug([x], torch.Generator().manual_seed(0))[0]
    b = aug([x], torch.Generator().manual_seed(0))[0]
    c = aug([x], torch.Generator().manual_seed(1))[0]
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert float(a.min()) >= float(x.min()) - 1e-6 and float(a.max()) <= float(x.max()) + 1e-6  # crops, no new values
    nhwc = augmenter([InputSpec(name="image", shape=[1, 32, 32, 3])])
    assert nhwc([x.permute(0, 2, 3, 1)], torch.Generator().manual_seed(0))[0].shape == (2, 32, 32, 3)


def test_token_views_are_spans_between_the_first_and_last_token():
    specs = [InputSpec(name="input_ids", shape=[1, 16], dtype="int64"),
             InputSpec(name="attention_mask", shape=[1, 16], dtype="int64")]
    aug = augmenter(specs)
    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 10, 11, 12, 13, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    seen = set()
    for seed in range(20):
        v_ids, v_mask = aug([ids, mask], torch.Generator().manual_seed(seed))
        n = int(v_mask.sum())
        row = v_ids[0, :n].tolist()
        assert row[0] == 101 and row[-1] == 102 and 6 <= n <= 11
        body = row[1:-1]
        assert body == list(range(body[0], body[0] + len(body)))  # one contiguous span of the original
        assert v_ids[0, n:].eq(0).all() and v_mask[0, n:].eq(0).all()
        seen.add(tuple(row))
    assert len(seen) > 5


def test_no_augmentation_for_other_inputs_is_one_line():
    with pytest.raises(RecipeError, match="augment"):
        augmenter([InputSpec(name="x", shape=[1, 10])])


def _photo_folders(tmp_path, n_main: int = 64, n_more: int = 64) -> None:
    from PIL import Image

    from crops import crops

    for name, n, seed in (("photos", n_main, 0), ("more", n_more, 7)):
        x, ids = crops(n, seed)
        for i, (img, src) in enumerate(zip(x, ids)):
            folder = tmp_path / name / f"src{src:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            rgb = np.clip(img.transpose(1, 2, 0) * 128 + 127, 0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(folder / f"{i}.png")


def _recipe(tmp_path, **data) -> dict:
    return {"version": 1, "name": "photos", "model": {"factory": "crops.py:teacher"},
            "inputs": [{"name": "image", "shape": [1, 3, 24, 24], "dtype": "float32"}], "outputs": ["logits"],
            "metric": {"name": "agreement"},
            "data": {"kind": "images", "path": "photos", "group_by": "folder",
                     "image": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
                     "splits": {"train": 0.5, "val": 0.25, "test": 0.25}, "calibration_samples": 16, **data},
            "stages": {"train": {"enabled": False}, "prune": {"ratio": 0.5},
                       "distill": {"epochs": 2, "batch_size": 32, "augment": "auto"}},
            "targets": [{"name": "ort-cpu", "max_accuracy_drop": 100, "measure": {"iterations": 20}}]}


@pytest.mark.skipif(not HAVE_PHOTOS, reason="scikit-image, Pillow and matplotlib ship the photos (edgebundle[real])")
def test_unlabelled_inputs_join_distillation_and_their_held_out_groups_check_the_student(tmp_path):
    import shutil

    from crops import __file__ as crops_file
    from edgebundle.pipeline.runner import run

    shutil.copy(crops_file, tmp_path / "crops.py")
    _photo_folders(tmp_path)
    plain = load_dataset(recipe_from_dict(_recipe(tmp_path), base_dir=tmp_path))
    d = _recipe(tmp_path, unlabelled={"path": "more", "held_out": 0.25})
    ds = load_dataset(recipe_from_dict(d, base_dir=tmp_path))
    assert plain.unlabelled is None and ds.fingerprint != plain.fingerprint
    assert len(ds.unlabelled) + len(ds.held_out) == 64
    seen, held = set(ds.unlabelled.groups.tolist()), set(ds.held_out.groups.tolist())
    assert held and not (seen & held) and len(held) == 4  # a quarter of the 16 source folders
    assert len(ds.distill_train) == len(ds.train) + len(ds.unlabelled) and ds.distill_train.labels is None
    np.testing.assert_array_equal(ds.distill_train.inputs["image"][np.array([len(ds.train)])],
                                  ds.unlabelled.inputs["image"][np.array([0])])
    assert ds.splits["held_out"]["groups"] == 4

    res = run(recipe_from_dict(d, base_dir=tmp_path), output=tmp_path / "out")
    distill = next(a for a in res.prepared.lineage if a.stage == "distill")
    assert distill.metrics["unlabelled_inputs"] == len(ds.unlabelled)
    assert distill.config["distill"]["augment"] == "auto"
    held_out = res.bundles[0].manifest["accuracy"]["student_vs_teacher"]["held_out"]
    assert held_out["inputs"] == len(ds.held_out) and held_out["groups"] == 4
    assert 0 <= held_out["top1_agreement"] <= 100


def test_held_out_groups_too_few_to_resolve_the_budget_are_bad_input():
    """One flip on the held-out groups must not decide a points budget alone: like the test split, they need
    enough judged inputs (checked before the search's first candidate and before each target's build)."""
    from edgebundle.core.errors import DataError
    from edgebundle.core.metrics import Contract
    from edgebundle.core.recipe import MetricSpec
    from edgebundle.pipeline.evaluate import check_held_out_resolvable

    logits = np.random.default_rng(0).normal(size=(150, 10)).astype(np.float32) * 0.1
    logits[:, 0] += 20 * (np.arange(150) < 60)  # the original is confident on 60 of them
    top1 = Contract("top1", MetricSpec(name="top1", min_confidence=0.5), 1.0)
    with pytest.raises(DataError, match="data.unlabelled's held-out share has 60 inputs where the fp32 model is "
                                        "confident .* needs at least 100 .*data.unlabelled.held_out"):
        check_held_out_resolvable(top1, logits, "ort-cpu")  # top1 is judged as agreement there (no labels)
    check_held_out_resolvable(Contract("agreement", MetricSpec(name="agreement", min_confidence=0.5), 2.0), logits,
                              "ort-cpu")  # 2 points: 50 judged inputs do


def test_unlabelled_applies_to_images_and_text(tmp_path):
    d = _recipe(tmp_path, unlabelled={"path": "more"})
    d["data"] = {"kind": "digits", "unlabelled": {"path": "more"}}
    with pytest.raises(RecipeError, match="data.unlabelled applies to kinds"):
        recipe_from_dict(d, base_dir=tmp_path)


def _halves(tmp_path) -> dict:
    """Crops of 8 photo halves in one flat folder (so the test split holds new crops of the same 8 halves), and
    as data.unlabelled crops of the 8 other halves, one folder each, half of them held out; a student pruned by
    half and distilled for 30 epochs."""
    import shutil

    from PIL import Image

    from crops import __file__ as crops_file
    from crops import crops

    shutil.copy(crops_file, tmp_path / "crops.py")
    x, ids = crops(640, 3)
    for i, (img, src) in enumerate(zip(x, ids)):
        folder = tmp_path / ("photos" if src < 8 else f"more/src{src:02d}")
        folder.mkdir(parents=True, exist_ok=True)
        rgb = np.clip(img.transpose(1, 2, 0) * 128 + 127, 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{i}.png")
    d = _recipe(tmp_path, unlabelled={"path": "more", "held_out": 0.5, "group_by": "folder"})
    d["data"].update(group_by="auto", splits={"train": 0.5, "val": 0.2, "test": 0.3})
    d["metric"] = {"name": "agreement", "min_confidence": 0.5}
    d["stages"]["distill"] = {"epochs": 30}
    d["targets"] = [{"name": "ort-cpu", "max_accuracy_drop": 10, "options": {"precision": "fp32"},
                     "measure": {"iterations": 10}}]
    return d


@pytest.mark.skipif(not HAVE_PHOTOS, reason="scikit-image, Pillow and matplotlib ship the photos (edgebundle[real])")
def test_a_student_that_holds_the_test_split_but_not_the_held_out_groups_is_rejected(tmp_path):
    """The data: crops of 8 photo halves in one flat folder, so the test split holds new crops of the same 8
    halves; data.unlabelled: crops of the 8 other halves, one folder each, half of them held out. The student
    distilled on those agrees with the teacher on the test split and not on the 4 halves no stage saw: rejected,
    the line naming distillation and the held-out groups."""
    from edgebundle.pipeline.runner import run

    d = _halves(tmp_path)
    res = run(recipe_from_dict(d, base_dir=tmp_path), output=tmp_path / "out", keep_rejected=True)
    (b,) = res.bundles
    acc = b.manifest["accuracy"]
    assert acc["chain"][1]["held_out_vs_original"]["groups"] == 4
    assert b.status == "rejected", acc
    assert acc["target"] >= 90  # the test split alone would have shipped it
    rejection = b.manifest["target"]["rejection"]
    assert "distillation" in rejection and "held-out groups" in rejection and "does not generalize" in rejection


@pytest.mark.skipif(not HAVE_PHOTOS, reason="scikit-image, Pillow and matplotlib ship the photos (edgebundle[real])")
def test_the_search_refuses_a_candidate_that_misses_the_held_out_groups(tmp_path):
    """The same student as a search candidate (30 epochs of the search's distillation): it holds the validation
    split, not the held-out groups, so the search refuses it before building it and keeps the unpruned model."""
    from edgebundle.pipeline.runner import run

    d = _halves(tmp_path)
    d["stages"]["prune"] = {"ratio": "auto", "search_ratios": [0.5], "search_epochs": 30}
    res = run(recipe_from_dict(d, base_dir=tmp_path), output=tmp_path / "out")
    search = res.bundles[0].manifest["search"]
    rows = {r["label"]: r for r in search["rows"]}
    half = rows["ratio 0.5"]
    assert half["held_out_over"] and not half["within"] and "speedup" not in half, half
    assert "fp32_over" not in half and half["value"] >= 90  # it held the validation split
    assert "held-out groups" in half["summary"]
    assert search["chosen"]["ratio"] == 0.0 and "no pruned structure held" in search["outcome"]


def test_bad_unlabelled_inputs_are_one_line_each(tmp_path):
    """A folder that is not there, a file where a folder belongs, an unreadable image, a held-out share that
    leaves nothing to learn from: each one DataError naming it, before any work."""
    from PIL import Image

    from edgebundle.core.errors import DataError

    rng = np.random.default_rng(0)
    for name in ("photos", "one"):
        (tmp_path / name).mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "one" / "0.png")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_text("not an image")
    for unlabelled, message in (({"path": "missing"}, "image folder not found"),
                                ({"path": "photos/0.png"}, "is a file, not a folder"),
                                ({"path": "broken"}, "cannot read image"),
                                ({"path": "one", "held_out": 0.9}, "held_out leaves nothing to learn from")):
        d = {"version": 1, "model": {"factory": "crops.py:teacher"},
             "inputs": [{"name": "image", "shape": [1, 3, 24, 24]}],
             "data": {"kind": "images", "path": "photos", "unlabelled": unlabelled}}
        with pytest.raises(DataError, match=message):
            load_dataset(recipe_from_dict(d, base_dir=tmp_path))


def test_a_data_function_takes_its_unlabelled_inputs_from_a_function_of_its_own(tmp_path):
    """kind function: data.unlabelled.function yields batches as data.function does, with its own groups (a
    share of them held out); a path there, or a function for an image folder, is one line."""
    import shutil

    from crops import __file__ as crops_file

    shutil.copy(crops_file, tmp_path / "crops.py")
    d = _recipe(tmp_path, kind="function", function="crops.py:data", kwargs={"n": 96},
                unlabelled={"function": "crops.py:data", "kwargs": {"n": 64, "seed": 7}, "held_out": 0.25})
    for key in ("path", "image", "group_by"):
        d["data"].pop(key)
    ds = load_dataset(recipe_from_dict(d, base_dir=tmp_path))
    assert len(ds.unlabelled) + len(ds.held_out) == 64
    seen, held = set(ds.unlabelled.groups.tolist()), set(ds.held_out.groups.tolist())
    assert len(held) == 4 and not (seen & held)  # a quarter of the function's 16 sources
    assert len(ds.distill_train) == len(ds.train) + len(ds.unlabelled)
    d["data"]["unlabelled"] = {"path": "more"}
    with pytest.raises(RecipeError, match="kind 'function' takes unlabelled.function"):
        recipe_from_dict(d, base_dir=tmp_path)
    d = _recipe(tmp_path, unlabelled={"function": "crops.py:data"})
    with pytest.raises(RecipeError, match="kind 'function' takes unlabelled.function"):
        recipe_from_dict(d, base_dir=tmp_path)


@pytest.mark.parametrize("ref, pattern", [
    ("bad.py:boom", r"data\.unlabelled\.function bad\.py:boom failed: ValueError: broken source"),
    ("bad.py:wrong_keys", r"data\.unlabelled\.function batch has no 'image'"),
    ("bad.py:missing", r"data\.unlabelled\.function"),
])
def test_a_broken_unlabelled_function_is_one_line_and_exit_2(tmp_path, ref, pattern):
    """A data.unlabelled.function that raises, yields the wrong keys or is not there: one error line naming
    data.unlabelled.function, exit 2, no bundle."""
    import re
    import shutil

    import yaml
    from typer.testing import CliRunner

    from crops import __file__ as crops_file
    from edgebundle.cli import app

    shutil.copy(crops_file, tmp_path / "crops.py")
    (tmp_path / "bad.py").write_text(
        "import numpy as np\n\n"
        "def boom():\n    raise ValueError('broken source')\n\n"
        "def wrong_keys():\n    yield {'x': np.zeros((4, 3, 24, 24), np.float32)}\n")
    d = _recipe(tmp_path, kind="function", function="crops.py:data", kwargs={"n": 96},
                unlabelled={"function": ref})
    for key in ("path", "image", "group_by"):
        d["data"].pop(key)
    d["output"] = str(tmp_path / "out")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert re.search(pattern, lines[0]), lines[0]
    out = tmp_path / "out"
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".work", ".locks"}
