"""Hostile and faulty input: nothing of the user's is lost, no bundle is built from bytes that do not match
their record. Each case is a reproduction with the exit code and the line it must print."""

from __future__ import annotations

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from conftest import default_dict, prepared_copy
from edgebundle.cli import app

cli = CliRunner()


ONE_TARGET = [{"name": "ort-cpu", "measure": {"iterations": 20}, "options": {"precision": "int8"}}]


def _work_copy(default_run, tmp_path):
    return prepared_copy(default_run, tmp_path, targets=ONE_TARGET)


def test_a_users_folder_at_a_bundles_place_is_refused_not_deleted(default_run, tmp_path):
    recipe, work = _work_copy(default_run, tmp_path)
    out = tmp_path / "out"
    (out / "ort-cpu").mkdir(parents=True)
    (out / "ort-cpu" / "important.txt").write_text("notes")
    res = cli.invoke(app, ["build", str(work), "-o", str(out), "--recipe", str(recipe)])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert f"refusing to replace {out / 'ort-cpu'}: it is not an edgebundle bundle" in line
    assert (out / "ort-cpu" / "important.txt").read_text() == "notes"

    # a bundle of ours replaces fine; a file the user then put into it makes it theirs again
    (out / "ort-cpu" / "important.txt").unlink()
    (out / "ort-cpu").rmdir()
    assert cli.invoke(app, ["build", str(work), "-o", str(out), "--recipe", str(recipe)]).exit_code == 0
    assert cli.invoke(app, ["build", str(work), "-o", str(out), "--recipe", str(recipe)]).exit_code == 0
    (out / "ort-cpu" / "important.txt").write_text("notes")
    res = cli.invoke(app, ["build", str(work), "-o", str(out), "--recipe", str(recipe)])
    assert res.exit_code == 2 and "holds files the bundle did not write or that changed since: important.txt" in \
        " ".join(res.output.split())
    assert (out / "ort-cpu" / "important.txt").read_text() == "notes"


def test_a_corrupted_cache_entry_is_recomputed_not_trusted(default_run, tmp_path):
    from edgebundle.core.artifact import sha256_file
    from edgebundle.core.recipe import load_recipe
    from edgebundle.pipeline.runner import prepare

    from edgebundle.pipeline.runner import load_prepared

    recipe, work = _work_copy(default_run, tmp_path)
    model = load_prepared(work).onnx.path("model.fp32.onnx")
    good = sha256_file(model)
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model.write_bytes(bytes(raw))
    events = []
    prepare(load_recipe(recipe), work, on_event=lambda kind, stage, **k: events.append((kind, stage, k)))
    starts = {s: k["cached"] for kind, s, k in events if kind == "start"}
    assert starts["export"] is False and starts["teacher"] is True  # only the corrupt entry is recomputed
    notes = [k["text"] for kind, s, k in events if kind == "note"]
    assert len(notes) == 1 and "model.fp32.onnx changed since it was written" in notes[0]
    assert sha256_file(model) == good  # the export is deterministic: the same bytes again
    assert not [p for p in work.iterdir() if ".corrupt-" in p.name]


def _bomb(path, size: int) -> None:
    """A .tar.gz whose one member is `size` bytes of zeros: a few hundred KB packed."""
    import io
    import tarfile

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            k = min(len(b), self.left)
            b[:k] = bytes(k)
            self.left -= k
            return k

    with tarfile.open(path, "w:gz") as tar:
        d = tarfile.TarInfo("bundle")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        ti = tarfile.TarInfo("bundle/model.onnx")
        ti.size = size
        tar.addfile(ti, io.BufferedReader(Zeros(size)))


def test_a_compression_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    _bomb(archive, 64 << 20)
    assert archive.stat().st_size < 1 << 20
    dest = tmp_path / "dest"
    dest.mkdir()
    res = cli.invoke(app, ["unpack", str(archive), "-o", str(dest)])
    assert res.exit_code == 2, res.output
    assert "refused: it would unpack to more than 100x its packed size" in " ".join(res.output.split())
    assert list(dest.iterdir()) == []
    res = cli.invoke(app, ["verify", str(archive), "--max-unpacked-size", "32M"])
    assert res.exit_code == 2 and "refused: it would unpack to more than 32.0 MiB" in " ".join(res.output.split())


def _run(tmp_path, **changes):
    d = default_dict()
    d.update(changes)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(path), "-o", str(tmp_path / "out")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    return res, " ".join(res.output.split()), lines


def _npz(folder, name, x, y=None):
    import numpy as np

    folder.mkdir(exist_ok=True)
    np.savez(folder / name, x=x.astype(np.float32), **({"y": y} if y is not None else {}))


def test_bad_data_and_bad_models_are_one_line_exit_2(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "neg"
    _npz(data, "a.npz", rng.standard_normal((40, 1, 8, 8)), np.r_[np.arange(39) % 10, -1])
    res, text, lines = _run(tmp_path, data={"kind": "folder", "path": str(data)})
    assert res.exit_code == 2 and len(lines) == 1
    assert f"data folder {data}: labels in a.npz include -1; classes are 0, 1, 2, ..." in text

    data = tmp_path / "shapes"
    _npz(data, "a.npz", rng.standard_normal((20, 1, 8, 8)), np.arange(20) % 10)
    _npz(data, "b.npz", rng.standard_normal((20, 1, 9, 9)), np.arange(20) % 10)
    res, text, lines = _run(tmp_path, data={"kind": "folder", "path": str(data)})
    assert res.exit_code == 2 and len(lines) == 1 and "in b.npz has per-sample shape [1, 9, 9], the first has [1, 8, 8]" in text

    (tmp_path / "gen.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    yield np.zeros((8, 1, 8, 8), np.float32), np.zeros(8, np.int64)\n"
        "    raise OSError('disk went away')\n"
        "def factory():\n"
        "    import sys\n"
        "    sys.exit(3)\n")
    res, text, lines = _run(tmp_path, data={"kind": "function", "function": "gen.py:batches"})
    assert res.exit_code == 2 and len(lines) == 1
    assert "data.function gen.py:batches failed after 1 batch(es): OSError: disk went away" in text
    res, text, lines = _run(tmp_path, model={"factory": "gen.py:factory"})
    assert res.exit_code == 2 and len(lines) == 1 and "model.factory gen.py:factory({}) called sys.exit(3)" in text


def test_absurd_counts_and_non_finite_numbers_are_refused(tmp_path):
    d = default_dict()
    for key, value, msg in (
            ("train", {"epochs": 99999999999999999999999999}, "stages.train.epochs: Input should be less than or equal to 100000"),
            ("prune", {"ratio": float("nan")}, "stages.prune.ratio: Input should be a finite number"),
            ("distill", {"lr": float("inf")}, "stages.distill.lr: Input should be a finite number")):
        res, text, lines = _run(tmp_path, stages={**d["stages"], key: {**d["stages"][key], **value}})
        assert res.exit_code == 2 and len(lines) == 1 and msg in text, text


def test_weights_files_that_cannot_be_used_say_why(tmp_path):
    import torch

    from edgebundle.core.errors import RecipeError
    from edgebundle.core.modelio import load_weights
    from edgebundle.zoo import digits_cnn

    model = digits_cnn()
    good = tmp_path / "w.pt"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    pickled = tmp_path / "p.pt"
    torch.save({"model": model}, pickled)
    import pytest

    for path, msg in ((tmp_path, "is a folder; give the weights file"),
                      (truncated, "it is truncated or not a PyTorch checkpoint"),
                      (pickled, "it holds pickled Python objects")):
        with pytest.raises(RecipeError, match=msg):
            load_weights(model, path)


def test_report_flags_a_tampered_bundle(default_run, tmp_path):
    from edgebundle.pipeline.report import write_report

    out = tmp_path / "out"
    shutil.copytree(default_run.bundles[0].path, out / "ort-cpu")
    m = out / "ort-cpu" / "manifest.json"
    m.write_text(m.read_text().replace('"p50_ms": ', '"p50_ms": 0.0001 + ', 1).replace("0.0001 + ", "", 1) + " ")
    html = write_report(out).read_text()
    assert "changed since written" in html and "manifest.json" in html


def test_fewer_calibration_samples_than_asked_is_noted(default_run, tmp_path):
    recipe, work = prepared_copy(default_run, tmp_path, targets=[
        {"name": "ort-cpu", "calibration": {"samples": 5000}, "measure": {"iterations": 20},
         "options": {"precision": "int8", "layer_errors": False}}])
    out = tmp_path / "out"
    assert cli.invoke(app, ["build", str(work), "-o", str(out), "--recipe", str(recipe)]).exit_code == 0
    m = yaml.safe_load((out / "ort-cpu" / "manifest.json").read_text())
    n = m["quantization"]["calibration"]["samples"]
    assert n < 5000 and f"calibration used {n} samples, fewer than the 5000 asked for" in " ".join(m["notes"])


def test_user_code_that_never_returns_ends_with_a_line_naming_it(tmp_path):
    (tmp_path / "slow.py").write_text(
        "import time\n"
        "def factory():\n"
        "    while True:\n"
        "        try:\n"
        "            time.sleep(10)\n"
        "        except Exception:\n"  # even code that swallows exceptions is stopped
        "            pass\n"
        "def batches():\n"
        "    time.sleep(3600)\n"
        "    yield None\n")
    res, text, lines = _run(tmp_path, model={"factory": "slow.py:factory"}, limits={"user_code_s": 1})
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "model.factory slow.py:factory did not return within 1 s (limits.user_code_s)" in text
    res, text, lines = _run(tmp_path, data={"kind": "function", "function": "slow.py:batches"},
                            limits={"user_code_s": 1})
    assert res.exit_code == 2 and len(lines) == 1 and "data.function slow.py:batches did not return within 1 s" in text


def test_wrong_kinds_of_file_say_what_they_are(tmp_path):
    """A folder given as the recipe, random bytes named .npz, a report of a folder with no bundles."""
    res = cli.invoke(app, ["run", str(tmp_path), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and f"recipe {tmp_path} is a folder; give the recipe's .yaml file" in res.output

    data = tmp_path / "junk"
    data.mkdir()
    (data / "a.npz").write_bytes(b"\x80\x04junk, not numpy")
    res, text, lines = _run(tmp_path, data={"kind": "folder", "path": str(data)})
    assert res.exit_code == 2 and len(lines) == 1
    assert "a.npz: not a numpy .npz/.npy file, or it holds pickled objects (never loaded" in text
    assert "allow_pickle" not in text

    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli.invoke(app, ["report", str(empty)])
    assert res.exit_code == 2 and "no bundles in" in res.output
    assert not (empty / "report.html").exists()


def _repoint(bundle, model_file: str) -> None:
    """Rewrite a bundle's manifest to name another model_file, with SHA256SUMS recomputed to match."""
    import hashlib
    import json

    m = json.loads((bundle / "manifest.json").read_text())
    m["model_file"] = model_file
    (bundle / "manifest.json").write_text(json.dumps(m))
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    lines = [ln for ln in (bundle / "SHA256SUMS").read_text().splitlines() if not ln.endswith("  manifest.json")]
    (bundle / "SHA256SUMS").write_text("\n".join(lines + [f"{digest}  manifest.json"]) + "\n")


def test_a_manifest_naming_a_file_outside_its_bundle_fails_verify_and_check_refuses_it(default_run, tmp_path):
    """model_file: ../outside.txt (or /dev/zero), SHA256SUMS recomputed: verify names it as outside the
    bundle (exit 1), and check refuses it in one line without opening it, for the folder and for a bare
    manifest.json alike."""
    src = default_run.output / "ort-cpu"
    for name in ("../outside.txt", "/dev/zero"):
        case = tmp_path / name.strip("./").replace("/", "_")
        bundle = case / "ort-cpu"
        shutil.copytree(src, bundle)
        (case / "outside.txt").write_text("not a model")
        _repoint(bundle, name)
        res = cli.invoke(app, ["verify", str(bundle)])
        assert res.exit_code == 1, res.output
        line = " ".join(res.output.split())
        assert "outside the bundle:" in line and f"model_file '{name}' (outside the bundle)" in line
        for target in (bundle, bundle / "manifest.json"):
            res = cli.invoke(app, ["check", str(target), "--baseline", str(src)])
            assert res.exit_code == 2, res.output
            line = " ".join(res.output.split())
            assert "names files outside itself" in line and "refused" in line and "Traceback" not in res.output


def test_messages_say_what_the_thing_is(tmp_path):
    """A data.path that is a file is called a file; random bytes as a .pt are not a checkpoint (not "pickled
    Python objects")."""
    import random

    d = default_dict()
    (tmp_path / "data.npz").write_bytes(b"x")
    d["data"] = {"kind": "folder", "path": "data.npz"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "is a file, not a folder" in " ".join(res.output.split()), res.output
    d = default_dict()
    (tmp_path / "w.pt").write_bytes(random.Random(0).randbytes(4096))  # fixed bytes: one message
    d["model"]["weights"] = "w.pt"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    line = " ".join(res.output.split())
    assert res.exit_code == 2 and "is not a PyTorch checkpoint" in line and "pickled" not in line, line


def test_user_code_that_swallows_the_time_limit_still_ends_with_one_line(tmp_path):
    """A metric function that catches BaseException in a loop: the stop is raised again until it lands
    outside the handler, or the process ends after a grace period; either way one line and exit 2."""
    import subprocess
    import sys

    (tmp_path / "m.py").write_text(
        "import time\n"
        "def score(out, ref, labels):\n"
        "    while True:\n"
        "        try:\n"
        "            time.sleep(10)\n"
        "        except BaseException:\n"
        "            pass\n")
    d = default_dict()
    d["stages"].update(train={"epochs": 1}, prune={"enabled": False}, distill={"enabled": False})
    d.update(metric={"name": "m.py:score"}, limits={"user_code_s": 1},
             targets=[{"name": "ort-cpu", "measure": {"iterations": 10}}])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "edgebundle.cli", "run", str(tmp_path / "r.yaml"), "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and "metric function m.py:score did not return within 1 s" in lines[0], r.stdout + r.stderr


MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, body="ok"):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(64, 10)

    def forward(self, image):
        x = image.flatten(1)
        if self.body == "batch1":
            return self.fc(image.view(1, 64))  # written for batch 1 only
        if self.body == "mean":
            return self.fc(x).mean(0, keepdim=True)  # one row, whatever the batch
        if self.body == "long":
            return self.fc(x).round().long()
        if self.body == "scalar":
            return self.fc(x).sum()
        if self.body == "range":
            torch._assert(x.abs().max() < 0.5, "input out of range")  # zeros pass; the data do not
        if self.body == "boom" and self.training:
            raise RuntimeError("boom in training mode")
        return self.fc(x)


class Free(nn.Module):
    def forward(self, image):
        return image.flatten(1)[:, :10]


def build(body="ok"):
    return Net(body)


def free():
    return Free()
'''


@pytest.mark.parametrize("body, says", [
    ("batch1", "the model fails on 2 inputs of the data (the stages run it on batches of them): RuntimeError"),
    ("range", "the model fails on 2 inputs of the data (the stages run it on batches of them): AssertionError: "
              "input out of range"),
    ("mean", "output 'logits' has shape [1, 10] for a batch of 2 inputs; its first dimension must be the batch"),
    ("scalar", "output 'logits' has shape [] for a batch of 2 inputs"),
    ("long", "output 'logits' is int64; metrics and distillation compare floating-point outputs"),
    ("free", "the model has no weights to learn; stages train, prune, distill change them"),
    ("boom", "stage 'teacher' failed: RuntimeError: boom in training mode"),
])
def test_a_model_that_only_fails_on_real_batches_is_one_line_before_any_work(tmp_path, body, says):
    """The zeros of the input's shape (batch 1) pass; real batches of the data, training mode or the outputs' form
    do not: one line naming what is wrong, exit 2, and no output folder (the run made nothing)."""
    (tmp_path / "models.py").write_text(MODELS)
    d = default_dict()
    d["model"] = {"factory": "./models.py:free"} if body == "free" else {"factory": "./models.py:build",
                                                                       "kwargs": {"body": body}}
    d["stages"]["train"] = {"epochs": 1}
    d["targets"] = ONE_TARGET
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    line = " ".join(res.output.split())
    assert res.exit_code == 2 and says in line and line.count("error:") == 1, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_name_the_tensors_and_a_checkpoint_around_them_loads(tmp_path):
    import torch

    from edgebundle.zoo import digits_cnn

    d = default_dict()
    d["model"]["kwargs"] = {**d["model"].get("kwargs", {}), "width": 8}
    d["stages"].update(train={"enabled": False}, prune={"enabled": False}, distill={"enabled": False})
    d["targets"] = ONE_TARGET
    torch.save(digits_cnn(width=32).state_dict(), tmp_path / "wide.pt")
    d["model"]["weights"] = "wide.pt"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    line = " ".join(res.output.split())
    assert res.exit_code == 2 and "do not fit the model:" in line and "of another shape (" in line, line
    assert "[32, 1, 3, 3] in the file, [8, 1, 3, 3] in the model" in line, line

    torch.save({"model": digits_cnn(width=8).state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    d["model"]["weights"] = "ckpt.pt"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code in (0, 1) and "do not fit" not in res.output, res.output


def test_usage_errors_are_one_line_with_exit_2():
    import subprocess
    import sys

    for args, says in ((["run", "--bogus"], "No such option: --bogus (see "),
                       (["frobnicate"], "No such command 'frobnicate'.")):
        r = subprocess.run([sys.executable, "-m", "edgebundle.cli", *args], capture_output=True, text=True,
                           timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr


DATA = '''
import numpy as np
import torch
from sklearn.datasets import load_digits


def batches(kind):
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.float64)
    if kind == "ragged":
        yield {"image": [row for row in x[:20]] + [np.zeros((1, 9, 9), np.float32)], "label": y[:21]}
    elif kind == "grad":  # a tensor still attached to a graph: the data are its values
        yield torch.tensor(x, requires_grad=True), y
    elif kind == "huge":
        yield x, np.full(len(x), 1e20)
    elif kind == "inf":
        yield x, np.where(np.arange(len(x)) == 3, np.inf, y)


def five():
    return 5
'''


@pytest.mark.parametrize("kind, says", [
    ("ragged", "data.function ./data.py:batches: 'image' in batch 1 is not one array (ValueError"),
    ("huge", "labels in batch 1 include 1e+20; classes are 0, 1, 2, ... (at most 2147483647)"),
    ("inf", "labels in batch 1 include NaN or Inf"),
    ("grad", None),
])
def test_data_that_numpy_cannot_take_as_it_is_is_one_line(tmp_path, kind, says):
    """Rows that form no array, labels that are no class index (they would wrap when cast), infinite labels: one
    line each, no numpy warning before it; a torch tensor that requires grad is taken by its values."""
    import subprocess
    import sys

    (tmp_path / "data.py").write_text(DATA)
    d = default_dict()
    d["data"] = {"kind": "function", "function": "./data.py:batches", "kwargs": {"kind": kind}}
    d["stages"].update(train={"epochs": 1}, prune={"enabled": False}, distill={"enabled": False})
    d["targets"] = ONE_TARGET
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    if says is None:
        from edgebundle.core.data import load_dataset
        from edgebundle.core.recipe import load_recipe

        assert len(load_dataset(load_recipe(tmp_path / "r.yaml")).train) > 1000
        return
    r = subprocess.run([sys.executable, "-m", "edgebundle.cli", "prepare", str(tmp_path / "r.yaml"), "-o",
                        str(tmp_path / "work")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr


def test_dynamic_axes_that_share_a_name_must_share_a_size(tmp_path):
    d = default_dict()
    d["inputs"][0]["dynamic_axes"] = {0: "b", 2: "b"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    res = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")])
    line = " ".join(res.output.split())
    assert res.exit_code == 2 and "dynamic axes 0 and 2 share the name 'b' (one size) but have 1 and 8" in line, line
    d["inputs"][0]["dynamic_axes"] = {0: "batch", 2: "side", 3: "side"}  # a square image's sides: one size
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    from edgebundle.core.recipe import load_recipe

    assert load_recipe(tmp_path / "r.yaml").inputs[0].dynamic_axes == {0: "batch", 2: "side", 3: "side"}


def test_a_model_written_for_its_fixed_batch_is_checked_at_that_batch(tmp_path):
    """An input without a dynamic batch axis is judged at its own batch size (iter_feeds): a model written for
    batch 1 passes the check on real inputs where nothing trains it."""
    from edgebundle.core.recipe import load_recipe
    from edgebundle.pipeline.prepare import _check_inputs

    (tmp_path / "models.py").write_text(MODELS)
    d = default_dict()
    d["model"] = {"factory": "./models.py:build", "kwargs": {"body": "batch1"}}
    d["inputs"][0]["dynamic_axes"] = {}
    d["stages"].update(train={"enabled": False}, prune={"enabled": False}, distill={"enabled": False})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    assert len(_check_inputs(load_recipe(tmp_path / "r.yaml")).test) > 100


def test_work_folder_records_of_another_shape_are_one_line(default_run, tmp_path):
    import json

    recipe, work = _work_copy(default_run, tmp_path)
    doc = json.loads((work / "prepared.json").read_text())
    for broken, says in (([1, 2], "has format a JSON list; this edgebundle reads format 1"),
                         ({k: v for k, v in doc.items() if k != "artifacts"},
                          "holds records this edgebundle did not write (KeyError: 'artifacts')")):
        (work / "prepared.json").write_text(json.dumps(broken))
        res = cli.invoke(app, ["build", str(work), "-o", str(tmp_path / "out")])
        line = " ".join(res.output.split())
        assert res.exit_code == 2 and says in line and line.count("error:") == 1, res.output


def test_a_data_function_that_returns_no_batches_says_what_it_returned(tmp_path):
    from edgebundle.core.data import load_dataset
    from edgebundle.core.errors import DataError
    from edgebundle.core.recipe import load_recipe

    (tmp_path / "data.py").write_text(DATA)
    d = default_dict()
    d["data"] = {"kind": "function", "function": "./data.py:five"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(DataError, match=r"data.function ./data.py:five returned int, not batches"):
        load_dataset(load_recipe(tmp_path / "r.yaml"))


def test_a_manifest_edited_to_hold_garbage_is_refused_naming_the_field(default_run, tmp_path):
    """Hashes recomputed around a manifest with no inputs, a tensor type that does not exist or a negative
    dimension: check, report and explain refuse it in one line naming the field (exit 2), not the library's
    error from deep inside."""
    import json

    src = default_run.output / "ort-cpu"
    cases = {"inputs": (lambda m: m.update(inputs=[]), "invalid at inputs: List should have at least 1 item"),
             "dtype": (lambda m: m["inputs"][0].update(dtype="bfloat99"),
                       "invalid at inputs.0.dtype: Value error, 'bfloat99' is not a tensor type"),
             "shape": (lambda m: m["outputs"][0].update(shape=[1, -3]),
                       "invalid at outputs.0.shape: Value error, [1, -3] has a negative dimension")}
    for name, (edit, want) in cases.items():
        bundle = tmp_path / name / "ort-cpu"
        shutil.copytree(src, bundle)
        m = json.loads((bundle / "manifest.json").read_text())
        edit(m)
        (bundle / "manifest.json").write_text(json.dumps(m))
        _repoint(bundle, m["model_file"])  # SHA256SUMS recomputed: only the content is wrong
        for args in (["check", str(bundle), "--baseline", str(src)], ["report", str(bundle.parent)],
                     ["explain", str(bundle)]):
            res = cli.invoke(app, args)
            line = " ".join(res.output.split())
            assert res.exit_code == 2 and want in line and "Traceback" not in res.output, (args, res.output)
