"""Data as users bring it: image folders (class sub-folders or flat) and text files (.txt, .csv, .jsonl),
preprocessed as the recipe says; bad inputs on each path are one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import default_dict
from edgebundle.cli import app
from edgebundle.core.recipe import ImageSpec, InputSpec, TextSpec

PIL = pytest.importorskip("PIL", reason="Pillow is not installed (pip install edgebundle[real])")
cli = CliRunner()


def _photos():
    """Real photos that ship with scikit-learn: china.jpg and flower.jpg (427 x 640 RGB)."""
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def _save(arr, path, size=None):
    from PIL import Image

    im = Image.fromarray(arr)
    if size:
        im = im.resize(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def test_an_image_folder_with_class_subfolders_gives_labels_in_sorted_class_order(tmp_path):
    from edgebundle.core.sources import read_images

    china, flower = _photos()
    _save(china, tmp_path / "temple" / "a.jpg")
    _save(china[:300, :300], tmp_path / "temple" / "b.png")
    _save(flower, tmp_path / "flower" / "c.png")  # lossless: compared pixel for pixel below
    spec = ImageSpec(resize=256, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    x, y, classes = read_images(tmp_path, spec, InputSpec(name="image", shape=[1, 3, 224, 224]))
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32
    assert classes == ["flower", "temple"] and y.tolist() == [0, 1, 1]
    # the flower photo by hand: shorter side to 256, center crop 224, (x/255 - .5)/.25, channels first
    from PIL import Image

    im = Image.fromarray(flower)
    im = im.resize((round(640 * 256 / 427), 256), Image.Resampling.BILINEAR)
    left, top = (im.size[0] - 224) // 2, (256 - 224) // 2
    want = ((np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255 - 0.5) / 0.25)
    np.testing.assert_allclose(x[0], want.transpose(2, 0, 1), atol=1e-6)


def test_a_flat_image_folder_is_unlabeled_and_nhwc_and_grayscale_follow_the_input(tmp_path):
    from edgebundle.core.sources import read_images

    china, _ = _photos()
    for i in range(3):
        _save(china[i * 50:i * 50 + 200], tmp_path / f"{i}.jpg")
    lazy, y, classes = read_images(tmp_path, ImageSpec(layout="NHWC"), InputSpec(name="x", shape=[1, 64, 64, 3]))
    assert lazy.shape == (3, 64, 64, 3) and y is None and classes == []
    x = np.asarray(lazy)  # decoded on access: all rows, a view's rows, one row
    assert x.shape == (3, 64, 64, 3) and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(lazy.view(np.array([2, 0]))[:], x[[2, 0]])
    np.testing.assert_array_equal(lazy[1], x[1])
    g, _, _ = read_images(tmp_path, ImageSpec(), InputSpec(name="x", shape=[1, 1, 8, 8]))
    assert g.shape == (3, 1, 8, 8)


def test_an_image_folder_feeds_a_whole_run(tmp_path):
    """The embedded default's CNN (1 x 8 x 8 inputs) on an image folder of real photo crops in 10 classes."""
    china, flower = _photos()
    rng = np.random.default_rng(0)
    for k in range(10):
        for i in range(8):
            src = china if k % 2 else flower
            r, c = rng.integers(0, 300), rng.integers(0, 500)
            _save(src[r:r + 120, c:c + 120], tmp_path / "photos" / f"class{k}" / f"{i}.png", size=(16, 16))
    d = default_dict()
    d["data"] = {"kind": "images", "path": "photos", "image": {"mean": [0.5], "std": [0.5]},
                 "calibration_samples": 16}
    d["stages"] = {"train": {"epochs": 2}, "prune": {"enabled": False}, "distill": {"enabled": False}}
    d["targets"] = [{"name": "ort-cpu", "measure": {"iterations": 10}, "max_accuracy_drop": 100.0}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    prepared = json.loads((tmp_path / "out" / ".work" / "prepared.json").read_text())
    data_art = next(p for p in (tmp_path / "out" / ".work").iterdir() if p.name.startswith("data-"))
    meta = json.loads((data_art / "artifact.json").read_text())
    assert meta["metrics"]["classes"] == [f"class{k}" for k in range(10)]
    assert prepared["recipe"]["data"]["kind"] == "images"
    # the bundle says which class each score is, as does one built from the work folder alone
    manifest = json.loads((tmp_path / "out" / "ort-cpu" / "manifest.json").read_text())
    assert manifest["outputs"][0]["classes"] == [f"class{k}" for k in range(10)]
    res = cli.invoke(app, ["build", str(tmp_path / "out" / ".work"), "-o", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "ort-cpu" / "manifest.json").read_text())
    assert again["outputs"][0]["classes"] == manifest["outputs"][0]["classes"]
    with np.load(data_art / "test.npz") as z:  # the photos' bytes, not their decoded rows
        assert "packed:image:bytes" in z.files and "input:image" not in z.files


def test_an_image_folder_is_stored_in_the_work_folder_as_its_files_not_as_decoded_floats(tmp_path):
    """The data stage keeps an image split as the image files' bytes (a JPEG crop is a fraction of its float32
    row), or as the cropped pixels in a lossless PNG where the file is larger than them; both decode to the
    very rows the source gave."""
    from edgebundle.core.data import Split
    from edgebundle.core.sources import PACKED_FILE, PACKED_PIXELS, read_images
    from edgebundle.stages.data import load_split, save_split

    china, flower = _photos()
    for i in range(6):
        _save(china[i * 40:i * 40 + 200, i * 50:i * 50 + 200], tmp_path / "photos" / f"{i}.jpg")
    _save(flower, tmp_path / "photos" / "big.png")  # 800 KB: larger than its 96 x 96 crop
    rows, _, _ = read_images(tmp_path / "photos", ImageSpec(resize=110, mean=[0.5] * 3, std=[0.25] * 3),
                             InputSpec(name="image", shape=[1, 3, 96, 96]))
    split = Split({"image": rows}, None, np.arange(7)).take(np.array([6, 0, 3, 5])).materialized()
    assert isinstance(split.inputs["image"], np.ndarray)  # made in memory, its lazy rows kept for storing
    save_split(split, tmp_path / "test.npz")
    with np.load(tmp_path / "test.npz") as z:
        assert "input:image" not in z.files
        assert z["packed:image:kind"].tolist() == [PACKED_PIXELS, PACKED_FILE, PACKED_FILE, PACKED_FILE]
    floats = split.inputs["image"].nbytes
    assert (tmp_path / "test.npz").stat().st_size < floats / 3
    back = load_split(tmp_path / "test.npz")
    np.testing.assert_array_equal(back.inputs["image"], split.inputs["image"])
    assert back.groups.tolist() == ["6", "0", "3", "5"]
    save_split(back.take(np.array([1, 0])), tmp_path / "again.npz")  # a stored split stores compactly again
    np.testing.assert_array_equal(load_split(tmp_path / "again.npz").inputs["image"], split.inputs["image"][[1, 0]])


def _tokenizer_folder(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "film", "a", "very", "the"]
    folder = tmp_path / "tok"
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    return folder


def test_text_files_are_tokenized_with_labels_from_tabs_or_columns(tmp_path):
    from edgebundle.core.sources import read_text

    tok = _tokenizer_folder(tmp_path)
    ins = [InputSpec(name="input_ids", shape=[1, 8], dtype="int64"),
           InputSpec(name="attention_mask", shape=[1, 8], dtype="int64")]
    (tmp_path / "a.txt").write_text("a good movie\tpos\n\nthe bad film\tneg\nvery good\tpos\n")
    x, y, classes = read_text(tmp_path / "a.txt", TextSpec(), ins, tok)
    assert x["input_ids"].shape == (3, 8) and x["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert classes == ["neg", "pos"] and y.tolist() == [1, 0, 1]
    (tmp_path / "b.csv").write_text("review,stars\na good movie,1\nthe bad film,0\n")
    x, y, classes = read_text(tmp_path / "b.csv", TextSpec(text_column="review", label_column="stars"), ins, tok)
    assert y.tolist() == [1, 0] and classes == []
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "good film"}) + "\n" + json.dumps({"text": "bad"}) + "\n")
    x, y, _ = read_text(tmp_path / "c.jsonl", TextSpec(), ins, tok)
    assert y is None and x["input_ids"][0, :4].tolist() == [2, 5, 8, 3]  # [CLS] good film [SEP]


def test_bad_images_and_text_are_one_line_exit_2(tmp_path):
    china, _ = _photos()
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    _save(china[:50, :50], tmp_path / "imgs" / "cat" / "ok.jpg")
    (tmp_path / "imgs" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "empty").mkdir()
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    (tmp_path / "bomb").mkdir()  # 564 bytes declaring 50000 x 50000 pixels
    (tmp_path / "bomb" / "big.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    cases = [
        ({"kind": "images", "path": "bomb"}, "declares more pixels than Pillow decodes safely", "big.png"),
        ({"kind": "images", "path": "imgs"}, "cannot read image", "broken.jpg"),
        ({"kind": "images", "path": "empty"}, "has no images", "empty"),
        ({"kind": "images", "path": "nowhere"}, "image folder not found", "nowhere"),
    ]
    tok = _tokenizer_folder(tmp_path)
    (tmp_path / "t.csv").write_text("body\nhello\n")
    (tmp_path / "notok").mkdir()
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "tokmodel.py").write_text(
        "from torch import nn\n"
        "def model():\n"
        "    return nn.Sequential(nn.Embedding(12, 4), nn.Flatten(), nn.Linear(32, 2))\n")
    d = default_dict()
    d["model"] = {"factory": "tokmodel.py:model"}
    d["inputs"] = [{"name": "input_ids", "shape": [1, 8], "dtype": "int64"}]
    cases_text = [
        ({"kind": "text", "path": "t.csv", "text": {"tokenizer": str(tok)}}, "no column 'text'", "columns: body"),
        ({"kind": "text", "path": "t.csv", "text": {"text_column": "body", "tokenizer": "notok"}},
         "no tokenizer in", "notok"),
        ({"kind": "text", "path": "bin.txt", "text": {"tokenizer": str(tok)}}, "is not UTF-8 text", "bin.txt"),
        ({"kind": "text", "path": "t.csv"}, "needs a tokenizer", "model.hf"),
    ]
    for data, want, also in cases + [(c, w, a) for c, w, a in cases_text]:
        dd = default_dict() if data["kind"] == "images" else dict(d)
        dd["data"] = data
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(dd))
        res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, (data, res.output)
        assert want in lines[0] and also in lines[0], (data, lines[0])


def test_image_and_text_options_are_checked_by_the_recipe():
    from pydantic import ValidationError

    from edgebundle.core.recipe import DataSpec

    with pytest.raises(ValidationError, match="needs data.path"):
        DataSpec(kind="images")
    with pytest.raises(ValidationError, match="applies to kinds 'images' and 'datasets' only"):
        DataSpec(kind="digits", image={"resize": 8})
    with pytest.raises(ValidationError, match="std must be > 0"):
        DataSpec(kind="images", path="x", image={"std": [0.0]})


def test_hostile_text_and_image_files_are_one_line_or_read_right(tmp_path):
    """A JSONL line that is not an object, a PNG declaring 50000x50000 pixels: one line naming the file. A CSV
    field over 128 KiB is read (and cut before tokenizing); a 16-bit PNG is scaled, not clipped; EXIF
    orientation is applied."""
    import numpy as np
    from PIL import Image

    from edgebundle.core.errors import DataError
    from edgebundle.core.recipe import InputSpec, TextSpec
    from edgebundle.core.sources import _rows, _upright_8bit

    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n42\n')
    with pytest.raises(DataError, match=r"a.jsonl, line 2: a JSON int, not an object"):
        _rows(tmp_path / "a.jsonl", TextSpec(text_column="text"))
    (tmp_path / "b.csv").write_text("text\n" + "x" * 300_000 + "\nshort\n")
    texts, _, _ = _rows(tmp_path / "b.csv", TextSpec(text_column="text"))
    assert len(texts[0]) == 300_000 and texts[1] == "short"

    # 16-bit grey: the full range maps to 0..255, mid-grey stays mid-grey
    a = np.array([[0, 32768, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        got = np.asarray(_upright_8bit(im))
    assert got.tolist() == [[0, 128, 255]]
    # EXIF orientation 6 (rotate 90 clockwise to view): a 2x1 image is shown 1x2
    im = Image.new("L", (2, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "r.jpg") as im:
        assert _upright_8bit(im).size == (1, 2)


def test_a_missing_or_structured_label_is_no_class(tmp_path):
    """JSONL labels that are null or objects were taken as classes named "None" or "{...}"."""
    from edgebundle.core.errors import DataError
    from edgebundle.core.sources import _classes

    assert _classes(["b", "a", "b"], tmp_path / "t.jsonl")[1] == ["a", "b"]
    for labels, says in (([1, None, 0], "the label of text 2 is missing"),
                         ([0, {"x": 1}], "the label of text 2 is a dict")):
        with pytest.raises(DataError, match=says):
            _classes(labels, tmp_path / "t.jsonl")
