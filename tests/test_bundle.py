import json
import os

import pytest

from edgebundle.core.errors import BundleError
from edgebundle.pipeline.bundle import check_output_folder, read_manifest, verify_files, write_bundle


def test_failed_fill_leaves_nothing(tmp_path, default_run):
    def fill(tmp):
        (tmp / "model.onnx").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_bundle(tmp_path, "ort-cpu", fill)
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]  # only the lock folder


def test_rewrite_replaces_whole_bundle(tmp_path, default_run):
    m = dict(default_run.bundles[0].manifest)
    m.pop("files")

    def fill_with(content):
        def fill(tmp):
            (tmp / "model.onnx").write_bytes(content)
            return m
        return fill

    p = write_bundle(tmp_path, "ort-cpu", fill_with(b"one"))
    write_bundle(tmp_path, "ort-cpu", fill_with(b"two"))
    assert (p / "model.onnx").read_bytes() == b"two"
    assert verify_files(p) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == [".locks", "ort-cpu"]
    (p / "model.onnx").write_bytes(b"twX")
    assert verify_files(p) == ["model.onnx"]
    # the file as its manifest says, but its SHA256SUMS line changed: SHA256SUMS is named, not the model
    (p / "model.onnx").write_bytes(b"two")
    sums = (p / "SHA256SUMS").read_text().splitlines()
    (p / "SHA256SUMS").write_text("\n".join(("0" * 64 + "  model.onnx") if ln.endswith("  model.onnx") else ln
                                            for ln in sums) + "\n")
    assert verify_files(p) == ["SHA256SUMS (its line for model.onnx)"]


def test_output_that_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(BundleError, match="is not a folder"):
        check_output_folder(f)


def test_output_below_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BundleError, match="cannot be created: .*file is not a folder"):
        check_output_folder(f / "bundles")


def test_newer_manifest_schema_is_refused(tmp_path, default_run):
    m = json.loads((default_run.bundles[0].path / "manifest.json").read_text())
    m["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 99"):
        read_manifest(tmp_path)
