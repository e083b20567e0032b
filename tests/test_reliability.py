"""Reliability: verifiable and packed bundles, hostile archives, crashes, full disks, corrupt models."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper
from typer.testing import CliRunner

from conftest import default_dict
from edgebundle.cli import app
from edgebundle.core.errors import BundleError
from edgebundle.pipeline.bundle import SUMS, pack, unpack, verify_files, write_bundle
from edgebundle.core.artifact import ARTIFACT_FILE, sha256_file

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle(default_run, tmp_path):
    """A private copy of the default's ort-cpu bundle, free to damage."""
    dest = tmp_path / "b" / "ort-cpu"
    shutil.copytree(default_run.bundles[0].path, dest)
    return dest


# ---- verify ------------------------------------------------------------------------------------------

def test_verify_passes_an_intact_bundle_and_sha256sum_agrees(bundle):
    r = runner.invoke(app, ["verify", str(bundle)])
    assert r.exit_code == 0, r.output
    if shutil.which("sha256sum"):  # the SHA256SUMS file is the standard tool's format
        subprocess.run(["sha256sum", "--quiet", "-c", SUMS], cwd=bundle, check=True)


@pytest.mark.parametrize("damage, named", [
    (lambda b: _flip(b / "model.onnx", 1000), "model.onnx"),
    (lambda b: (b / "model.onnx").unlink(), "model.onnx"),
    (lambda b: _edit_manifest(b, lambda m: m["latency"].update(p50_ms=0.001)), "manifest.json"),
    (lambda b: (b / "extra.bin").write_bytes(b"dropped in"), "extra.bin"),
])
def test_any_changed_byte_is_exit_1_naming_the_file(bundle, damage, named):
    damage(bundle)
    r = runner.invoke(app, ["verify", str(bundle)])
    assert r.exit_code == 1, r.output
    assert named in r.output and len(r.output.strip().splitlines()) == 1


def test_verify_without_sums_or_with_a_bad_manifest_is_an_error(bundle, tmp_path):
    (bundle / SUMS).unlink()
    r = runner.invoke(app, ["verify", str(bundle)])
    assert r.exit_code == 2 and "SHA256SUMS" in r.output
    r = runner.invoke(app, ["verify", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not found" in r.output


def _flip(p: Path, offset: int) -> None:
    b = bytearray(p.read_bytes())
    b[offset] ^= 0xFF
    p.write_bytes(bytes(b))


def _edit_manifest(b: Path, edit) -> None:
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m, indent=1))


def test_check_refuses_a_tampered_bundle(bundle):
    _flip(bundle / "model.onnx", 2000)
    r = runner.invoke(app, ["check", str(bundle), "--baseline", str(bundle)])
    assert r.exit_code == 2 and "changed since it was written: model.onnx" in " ".join(r.output.split())


# ---- packed bundles ----------------------------------------------------------------------------------

def test_pack_is_reproducible_and_unpacks_verified(bundle, tmp_path):
    a = pack(bundle)
    first = sha256_file(a)
    assert pack(bundle) == a and sha256_file(a) == first  # same bytes every time
    r = runner.invoke(app, ["unpack", str(a), "-o", str(tmp_path / "dest")])
    assert r.exit_code == 0, r.output
    assert verify_files(tmp_path / "dest" / "ort-cpu") == []
    assert runner.invoke(app, ["verify", str(a)]).exit_code == 0
    r = runner.invoke(app, ["unpack", str(a), "-o", str(tmp_path / "dest")])
    assert r.exit_code == 2 and "already exists" in r.output


def _archive(path: Path, members) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x"):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _link(name: str, target: str, kind=tarfile.SYMTYPE):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, target
    return ti, None


def _dev(name: str):
    ti = tarfile.TarInfo(name)
    ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
    return ti, None


HOSTILE = {
    "absolute path": ([_file("/tmp/edgebundle-evil")], "an absolute path"),
    "dot-dot": ([_file("ort-cpu/manifest.json"), _file("ort-cpu/../../evil")], "a '..' component"),
    "symlink outside": ([_file("ort-cpu/manifest.json"), _link("ort-cpu/model.onnx", "/etc/passwd")], "a link"),
    "hardlink outside": ([_file("ort-cpu/a"), _link("ort-cpu/b", "/etc/passwd", tarfile.LNKTYPE)], "a link"),
    "device file": ([_file("ort-cpu/a"), _dev("ort-cpu/null")], "special file"),
    "second top-level folder": ([_file("ort-cpu/a"), _file("other/b")], "outside the archive's bundle folder"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_unpack_refuses_hostile_archives_before_writing(tmp_path, case):
    members, why = HOSTILE[case]
    a = _archive(tmp_path / "evil.tar.gz", members)
    dest = tmp_path / "dest"
    r = runner.invoke(app, ["unpack", str(a), "-o", str(dest)])
    assert r.exit_code == 2 and why in r.output, r.output
    assert not dest.exists() and not Path("/tmp/edgebundle-evil").exists()


def test_unpack_refuses_truncated_and_tampered_archives(bundle, tmp_path):
    a = pack(bundle)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    r = runner.invoke(app, ["unpack", str(cut), "-o", str(tmp_path / "d1")])
    assert r.exit_code == 2 and "truncated or corrupt" in r.output
    _flip(bundle / "model.onnx", 1500)  # repacked with a changed model, manifest untouched
    r = runner.invoke(app, ["verify", str(pack(bundle))])
    assert r.exit_code == 1 and "model.onnx" in r.output
    with pytest.raises(BundleError, match="do not match the manifest: model.onnx"):
        unpack(bundle.parent / "ort-cpu.tar.gz", tmp_path / "d2")
    assert not (tmp_path / "d2" / "ort-cpu").exists()


# ---- corrupt models inside otherwise well-formed bundles -----------------------------------------------

def _unknown_domain_model() -> bytes:
    node = helper.make_node("Frobnicate", ["image"], ["logits"], domain="com.example.nope")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.example.nope", 1)])
    return m.SerializeToString()


@pytest.mark.parametrize("content, pattern", [
    (lambda good: good[: len(good) // 3], r"onnxruntime cannot load model\.onnx"),
    (lambda good: os.urandom(4096), r"onnxruntime cannot load model\.onnx"),
    (lambda good: _unknown_domain_model(), r"onnxruntime cannot load model\.onnx.*com\.example\.nope"),
])
def test_corrupt_model_in_a_consistent_bundle_is_one_line_exit_2(default_run, tmp_path, content, pattern):
    src = default_run.bundles[0]
    good = (src.path / "model.onnx").read_bytes()
    manifest = {k: v for k, v in json.loads((src.path / "manifest.json").read_text()).items() if k != "files"}

    def fill(tmp):
        (tmp / "model.onnx").write_bytes(content(good))
        return manifest

    bad = write_bundle(tmp_path / "out", "ort-cpu", fill)  # hashes match: only loading can tell
    r = runner.invoke(app, ["check", str(bad), "--baseline", str(src.path)])
    lines = [l for l in r.output.splitlines() if l.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    import re

    assert re.search(pattern, " ".join(r.output.split())), r.output


# ---- output folders that cannot hold a bundle ------------------------------------------------------------

def test_output_folder_that_cannot_be_created(tmp_path):
    r = runner.invoke(app, ["run", "-o", "/proc/edgebundle-out"])  # not creatable, not even by root
    lines = [l for l in r.output.splitlines() if l.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "/proc/edgebundle-out" in lines[0]


_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit then fails with EFBIG
from edgebundle.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["edgebundle", *sys.argv[2:]]
main()
"""


def test_disk_full_while_writing_a_bundle_leaves_nothing(default_run, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes past it fail like ENOSPC does."""
    work = default_run.output / ".work"
    assert runner.invoke(app, ["prepare", "-o", str(work)]).exit_code == 0
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", _FSIZE, "20000", "build", str(work), "-t", "ort-cpu", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    err = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert res.returncode == 2 and len(err) == 1, res.stderr[-3000:]
    assert "file size limit reached" in err[0] or "File too large" in err[0], err[0]
    assert {p.name for p in out.iterdir()} <= {".locks"}, list(out.iterdir())


# ---- crash safety -----------------------------------------------------------------------------------------

def _small_recipe(tmp_path: Path) -> Path:
    d = default_dict()
    d["stages"].update({"train": {"epochs": 3}, "distill": {"epochs": 3}})
    d["targets"] = [{"name": "ort-cpu", "measure": {"iterations": 50}}]
    d["output"] = str(tmp_path / "out")
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _consistent(out: Path) -> None:
    """Nothing that looks finished is incomplete: bundles verify, cache entries match their hashes."""
    for d in out.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            assert verify_files(d) == [], d
    work = out / ".work"
    if work.exists():
        for d in work.iterdir():
            if d.is_dir() and not d.name.startswith("."):
                rec = json.loads((d / ARTIFACT_FILE).read_text())
                for name, digest in rec["files"].items():
                    assert sha256_file(d / name) == digest, d / name


def _kill_when(recipe: Path, out: Path, ready) -> None:
    p = subprocess.Popen([sys.executable, "-m", "edgebundle.cli", "run", str(recipe)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if ready(out):
                break
            time.sleep(0.005)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def _any(pattern: str):
    return lambda out: any((out / ".work").glob(pattern)) or any(out.glob(pattern))


def test_sigkill_at_several_points_then_rerun_finishes_from_the_cache(tmp_path):
    recipe = _small_recipe(tmp_path)
    out = tmp_path / "out"
    points = [_any(".teacher-*.tmp-*"),   # mid teacher training
              _any("prune-*"),             # right after prune finished (distill starting)
              _any(".export-*.tmp-*"),     # mid export
              _any(".ort-cpu.tmp-*")]      # mid bundle write
    for ready in points:
        _kill_when(recipe, out, ready)
        _consistent(out)
        assert not (out / "ort-cpu").exists() or verify_files(out / "ort-cpu") == []
    res = subprocess.run([sys.executable, "-m", "edgebundle.cli", "run", str(recipe)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("(cached)") >= 3, res.stdout  # teacher, prune, distill at least were reused
    _consistent(out)
    assert verify_files(out / "ort-cpu") == []
    assert not list(out.glob(".ort-cpu.tmp-*")), "the next writer removed the killed writer's leftovers"


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "stopped: SIGTERM"),
                                             (signal.SIGINT, 130, "stopped: interrupted (Ctrl-C)")])
def test_sigterm_mid_run_is_one_line_and_leaves_nothing_half_written(tmp_path, sig, code, line):
    """SIGTERM (what a CI runner or `timeout` sends) or Ctrl-C mid teacher training: one line, exit 143 or 130,
    no temporary folder left, and a re-run finishes from the cache."""
    recipe = _small_recipe(tmp_path)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "edgebundle.cli", "run", str(recipe)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    ready = _any(".teacher-*.tmp-*")
    while p.poll() is None and time.monotonic() < deadline and not ready(out):
        time.sleep(0.005)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and line in lines[0], err
    assert not list((out / ".work").glob(".*.tmp-*")) and not list(out.glob(".*.tmp-*"))
    r = subprocess.run([sys.executable, "-m", "edgebundle.cli", "run", str(recipe)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
