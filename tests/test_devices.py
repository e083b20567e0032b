"""Bundles measured on the device that will run them: the device runner (one file, numpy and the runtime only)
pushed to this machine's folder, to an SSH server started here (the user's own OpenSSH client), or to an
emulated AVX2 machine; its timings summarized and its test-split outputs judged by the host, the record kept
in the manifest, the bundle still verifiable, and a bundle over budget on the device rejected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgebundle.cli import app
from edgebundle.core import device_runner
from edgebundle.core.errors import DeviceError, RecipeError
from edgebundle.core.host import fingerprint, hardware_id
from edgebundle.core.isa import exceeds, host_isa, qemu
from edgebundle.core.measure import time_block
from edgebundle.core.recipe import DeviceSpec, load_recipe
from edgebundle.pipeline.bundle import read_manifest, verify_files
from edgebundle.pipeline.build import build
from edgebundle.pipeline.remeasure import measure_bundle

from conftest import prepared_copy

ARM64_PYTHON = Path(os.environ.get("EDGEBUNDLE_ARM64_PYTHON")
                    or Path.home() / ".cache" / "edgebundle" / "arm64" / "python.sh")  # made by .ci/arm64-python.sh
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
runner = CliRunner()


def test_the_runner_is_the_hosts_protocol_and_fingerprint():
    """core.measure times with the runner's loop, and the runner describes this machine as the host's
    fingerprint does (same hardware id): a device figure and a host figure are made the same way."""
    assert len(time_block(lambda: None, 7)) == 7
    desc = device_runner.describe("onnxruntime", "x")
    fp = fingerprint()
    assert {k: desc[k] for k in ("cpu", "machine", "isa", "usable_cores")} == {
        k: fp[k] for k in ("cpu", "machine", "isa", "usable_cores")}
    assert hardware_id(desc) == fp["id"]
    out = subprocess.run([sys.executable, device_runner.__file__, "--describe"], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"})  # runs alone: it imports nothing of edgebundle
    assert hardware_id(__import__("json").loads(out.stdout)) == fp["id"]


def test_device_addresses():
    assert DeviceSpec.from_url("ssh://pi@10.0.0.7:2200").model_dump(include={"ssh", "port"}) == {
        "ssh": "pi@10.0.0.7", "port": 2200}
    assert DeviceSpec.from_url("local").kind == "local"
    for bad, says in (("ftp://x", "not a device address"), ("adb://R58M", "benchmark binary")):
        with pytest.raises(RecipeError, match=says):
            DeviceSpec.from_url(bad)
    with pytest.raises(ValueError, match="one of"):
        DeviceSpec(ssh="a@b", local=True)


def _work_for(bundle: Path, default_run, tmp_path: Path) -> Path:
    """A copy of the default's work folder prepared for the bundle's own recipe (other tests prepare other
    recipes into the shared one): every stage a cache hit."""
    from edgebundle.core.recipe import Recipe
    from edgebundle.pipeline.runner import prepare

    work = tmp_path / "work"
    shutil.copytree(default_run.output / ".work", work, ignore=shutil.ignore_patterns(".lock*"))
    prepare(Recipe.model_validate(read_manifest(bundle).recipe["json"]), work)
    return work


def _with_device(default_run, tmp_path, device: dict):
    d = yaml.safe_load(default_run.prepared.recipe.model_dump_json(exclude={"base_dir"}))
    target = next(t for t in d["targets"] if t["name"] == "ort-cpu")
    target["device"] = device
    return prepared_copy(default_run, tmp_path, targets=[target])


def test_build_with_a_local_device_records_its_measurement(default_run, tmp_path):
    recipe, work = _with_device(default_run, tmp_path, {"local": True})
    (b,) = build(work, recipe=load_recipe(recipe), output=tmp_path / "out")
    assert b.status == "complete", b.reason
    (rec,) = b.manifest["devices"]
    assert rec["device"] == "local" and rec["figure"] == "build host"  # this machine built it: not a device figure
    assert rec["accuracy"]["within_budget"] and rec["accuracy"]["samples"] == len(default_run.prepared.dataset.test)
    # the device ran the same artifact on the same kernels: its verdict is the host's
    assert rec["accuracy"]["value"] == pytest.approx(b.manifest["accuracy"]["target"])
    assert rec["latency"]["iterations"] >= 10 and rec["latency"]["p50_ms"] > 0
    assert not verify_files(b.path)


@pytest.mark.openvino
def test_an_openvino_bundle_measured_on_a_device(default_run, tmp_path):
    """The runner opens OpenVINO's IR (model.xml + .bin) with the bundle's own settings and its verdict on the
    device is the host's: the same artifact on the same kernels."""
    bundle = tmp_path / "openvino"
    shutil.copytree(default_run.output / "openvino", bundle)
    work = _work_for(bundle, default_run, tmp_path)
    done = measure_bundle(bundle, DeviceSpec(local=True, workdir=str(tmp_path / "dev")), work=work)
    rec = done.record
    assert "openvino" in rec["fingerprint"]["runtime"] and done.within
    assert rec["accuracy"]["value"] == pytest.approx(read_manifest(bundle).accuracy.target)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An OpenSSH server on 127.0.0.1 with a key of its own, run by this user (skips where sshd is missing)."""
    if SSHD is None:
        pytest.skip("OpenSSH's server is not installed (apt-get install openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "id.pub", d / "authorized_keys")
    try:
        Path("/run/sshd").mkdir(exist_ok=True)  # the privilege separation folder sshd checks for
    except OSError as e:
        pytest.skip(f"sshd needs /run/sshd, which this user cannot make ({e.strerror})")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"StrictModes no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\n"
        f"UsePAM no\nSubsystem sftp internal-sftp\n")
    proc = subprocess.Popen([SSHD, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "log")])
    for _ in range(50):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    opts = ["StrictHostKeyChecking=no", f"UserKnownHostsFile={d}/known_hosts"]
    yield DeviceSpec(ssh=f"{__import__('getpass').getuser()}@127.0.0.1", port=port, identity_file=d / "id",
                     ssh_options=opts, python=sys.executable, workdir=str(d / "remote"))
    proc.terminate()
    proc.wait(10)


def test_measure_over_ssh_judges_on_the_device_and_adds_a_record_each_time(default_run, tmp_path, sshd):
    bundle = tmp_path / "b" / "ort-cpu"
    shutil.copytree(default_run.output / "ort-cpu", bundle)
    work = _work_for(bundle, default_run, tmp_path)
    first = measure_bundle(bundle, sshd, work=work)
    assert first.within is True and first.record["kind"] == "ssh"
    assert first.record["fingerprint"]["runtime"]["onnxruntime"]
    assert first.record["figure"] == "build host"  # the SSH server is this machine
    m = read_manifest(bundle)
    assert m.devices[0]["accuracy"]["value"] == pytest.approx(m.accuracy.target)
    # latency only without the work folder: said so; a second record, the first kept; every file still verifies
    second = measure_bundle(bundle, sshd)
    assert second.record["accuracy"] is None and "--work" in second.record["note"]
    assert [r["taken"] for r in read_manifest(bundle).devices][0] == first.record["taken"]
    assert len(read_manifest(bundle).devices) == 2 and not verify_files(bundle)
    assert not list(Path(sshd.workdir).glob("job-*"))  # the device is left clean

    # the CLI: one line per outcome; an unreachable device is one line and exit 2, nothing changed
    args = ["--identity-file", str(sshd.identity_file), *sum((["--ssh-option", o] for o in sshd.ssh_options), []),
            "--python", sys.executable]
    res = runner.invoke(app, ["measure", str(bundle), "--device", f"ssh://{sshd.ssh}:{sshd.port}", *args])
    assert res.exit_code == 0 and "measured" in res.output and "--work" in res.output
    res = runner.invoke(app, ["measure", str(bundle), "--device", f"ssh://{sshd.ssh}:1", *args])
    assert res.exit_code == 2 and "Connection refused" in res.output and "Traceback" not in res.output
    assert len(read_manifest(bundle).devices) == 3 and not verify_files(bundle)

    # check --device gates on both bundles' newest records there; a bundle never measured there is bad input
    from edgebundle.pipeline.check import check

    cand = tmp_path / "cand" / "ort-cpu"
    shutil.copytree(bundle, cand)
    measure_bundle(cand, sshd, work=work)
    res = check(cand, bundle, device=sshd.label)  # the baseline's newest record there was not judged (no work)
    assert res.mode == f"device {sshd.label}" and res.baseline_accuracy is None and not res.accuracy_regression
    measure_bundle(bundle, sshd, work=work)
    res = check(cand, bundle, device=sshd.label)
    assert res.candidate_accuracy == pytest.approx(res.baseline_accuracy) and not res.accuracy_regression
    assert any("figure of the build host" in n for n in res.notes)
    res = runner.invoke(app, ["check", str(cand), "--baseline", str(default_run.output / "ort-cpu"),
                              "--device", sshd.label])
    assert res.exit_code == 2 and "no measurement on device" in res.output

    # the report beside the bundles shows every device
    from edgebundle.pipeline.report import render

    page = render([(cand, read_manifest(cand))])
    assert "Measured on devices" in page and sshd.label in page


def test_build_with_an_ssh_device_in_the_recipe(default_run, tmp_path, sshd):
    """A target's `device: {ssh: ...}` in the recipe: the bundle carries the far side's record (latency, the
    contract's verdict there, its fingerprint and runtime), verifies, and check --device compares on it."""
    device = sshd.model_dump(mode="json", exclude_defaults=True)
    recipe, work = _with_device(default_run, tmp_path, device)
    (b,) = build(work, recipe=load_recipe(recipe), output=tmp_path / "out")
    assert b.status == "complete", b.reason
    (rec,) = b.manifest["devices"]
    assert rec["kind"] == "ssh" and rec["device"] == sshd.label and rec["accuracy"]["within_budget"]
    assert rec["fingerprint"]["runtime"]["onnxruntime"] and rec["latency"]["samples_ms"]
    assert not verify_files(b.path)
    from edgebundle.pipeline.check import check

    res = check(b.path, b.path, device=sshd.label)
    assert res.candidate_accuracy == res.baseline_accuracy and not res.accuracy_regression


def test_device_failures_are_one_line_each(default_run, tmp_path, sshd):
    """Authentication refused (a key the server does not know) and a command past the device's time limit:
    one line naming the device, exit 2, the bundle as it was."""
    bundle = tmp_path / "ort-cpu"
    shutil.copytree(default_run.output / "ort-cpu", bundle)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    with pytest.raises(DeviceError, match=r"device .*127\.0\.0\.1.*Permission denied"):
        measure_bundle(bundle, sshd.model_copy(update={"identity_file": tmp_path / "stranger"}))
    with pytest.raises(DeviceError, match="ran past its time limit of 0.05 s"):
        measure_bundle(bundle, sshd.model_copy(update={"timeout_s": 0.05}))
    assert read_manifest(bundle).devices is None and not verify_files(bundle)


def test_a_device_without_the_runtime_is_one_line(default_run, tmp_path, sshd):
    bundle = tmp_path / "ort-cpu"
    shutil.copytree(default_run.output / "ort-cpu", bundle)
    bare = sshd.model_copy(update={"python": "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"})
    probe = subprocess.run([bare.python, "-c", "import onnxruntime"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{bare.python} has onnxruntime: no bare interpreter to show the line with")
    with pytest.raises(DeviceError, match="missing on this device: No module named"):
        measure_bundle(bundle, bare)
    assert read_manifest(bundle).devices is None and not verify_files(bundle)


EMULATES_AVX2 = exceeds(host_isa(), "avx2") and qemu() is not None


@pytest.mark.slow
@pytest.mark.skipif(not EMULATES_AVX2, reason=f"needs a host with more than AVX2 and qemu-x86_64 (this one: "
                                              f"{host_isa()}, qemu {'found' if qemu() else 'missing'})")
def test_a_bundle_over_budget_on_its_device_is_rejected_there(tmp_path):
    """The saturating model's int8 with 8-bit weights holds on this host's VNNI (about 39 dB) and loses on AVX2
    (about 15 dB). Built for the host, then measured on a device that computes as an AVX2 CPU does (its
    Python under qemu-x86_64 -cpu Haswell): rejected there, moved to ort-cpu.rejected, the figure labelled an
    emulator's, never a device's."""
    from test_isa import _recipe

    from edgebundle.pipeline.runner import run

    res = run(_recipe(tmp_path, {"reduce_range": False, "isa": "host"}))
    (b,) = res.bundles
    assert b.status == "complete", b.reason
    avx2 = DeviceSpec(local=True, python=f"{qemu()} -cpu Haswell {sys.executable}", workdir=str(tmp_path / "dev"),
                      name="avx2-box")
    done = measure_bundle(b.path, avx2, work=tmp_path / "out" / ".work")
    assert done.within is False and done.record["figure"] == "emulator"
    assert not b.path.exists() and done.bundle.name == "ort-cpu.rejected"
    m = read_manifest(done.bundle)
    assert m.target.status == "rejected" and "on device avx2-box" in m.target.rejection
    assert m.devices[0]["accuracy"]["value"] < 30 <= m.accuracy.target
    assert not verify_files(done.bundle)
    assert np.isfinite(m.devices[0]["latency"]["p50_ms"])


# The benchmark binaries' own lines, as their sources print them (executor_runner.cpp's ET_LOG format strings,
# onnxruntime_perf_test's summary, LiteRT benchmark_model's timing line)
EXECUTOR_RUNNER = """I 00:00:00.010 executorch:executor_runner.cpp:300] Model file model.pte is loaded.
I 00:00:00.020 executorch:executor_runner.cpp:420] Iteration 1 of 3: 4.250000 ms
I 00:00:00.024 executorch:executor_runner.cpp:420] Iteration 2 of 3: 4.010000 ms
I 00:00:00.028 executorch:executor_runner.cpp:420] Iteration 3 of 3: 4.100000 ms
I 00:00:00.028 executorch:executor_runner.cpp:430] Model executed successfully 3 time(s) in 12.360000 ms.
"""
PERF_TEST = """Session creation time cost: 0.21 s
Total inference requests: 200
Average inference time cost total: 3.5 ms
P50 Latency: 0.00341 s
"""
BENCHMARK_MODEL = """INFO: count=20 first=31500 curr=30900 min=30718 max=36410 avg=31118.1 std=1323
INFO: Inference timings in us: Init: 21432, First inference: 91020, Warmup (avg): 60125.5, Inference (avg): 31118.1
"""


def test_adb_benchmark_binaries_are_read_and_called_as_documented():
    from edgebundle.devices.adb import benchmark_argv, parse_benchmark

    et = parse_benchmark(EXECUTOR_RUNNER, "/data/local/tmp/executor_runner")
    assert et.samples_ms == (4.25, 4.01, 4.1) and et.runs == 3
    ort = parse_benchmark(PERF_TEST, "onnxruntime_perf_test")
    assert (ort.mean_ms, ort.p50_ms, ort.runs, ort.samples_ms) == (3.5, pytest.approx(3.41), 200, ())
    lite = parse_benchmark(BENCHMARK_MODEL, "benchmark_model")
    assert lite.mean_ms == pytest.approx(31.1181) and lite.runs == 20
    with pytest.raises(DeviceError, match="no latency in its output.*Segmentation fault"):
        parse_benchmark("loading\nSegmentation fault\n", "executor_runner")
    with pytest.raises(DeviceError, match="not a benchmark binary"):
        parse_benchmark("", "my_app")
    assert benchmark_argv("/x/executor_runner", "model.pte", runs=50, threads=4) == [
        "/x/executor_runner", "--model_path=model.pte", "--num_executions=50", "--cpu_threads=4"]
    assert benchmark_argv("benchmark_model", "model.tflite", runs=5, threads=None) == [
        "benchmark_model", "--graph=model.tflite", "--num_runs=5"]


@pytest.mark.skipif(shutil.which("adb") is None, reason="adb is not installed (apt-get install adb)")
def test_an_adb_device_that_is_not_connected_is_one_line(default_run, tmp_path):
    """The real adb client, no phone attached: one line naming the device, the bundle unchanged."""
    bundle = tmp_path / "ort-cpu"
    shutil.copytree(default_run.output / "ort-cpu", bundle)
    res = runner.invoke(app, ["measure", str(bundle), "--device", "adb://EB-NOT-CONNECTED", "--runner",
                              "/data/local/tmp/onnxruntime_perf_test"])
    assert res.exit_code == 2 and "device EB-NOT-CONNECTED" in res.output and "Traceback" not in res.output
    assert read_manifest(bundle).devices is None and not verify_files(bundle)
    res = runner.invoke(app, ["measure", str(bundle), "--device", "adb://EB-NOT-CONNECTED"])
    assert res.exit_code == 2 and "--runner" in res.output
    subprocess.run(["adb", "kill-server"], capture_output=True, timeout=30)


@pytest.mark.skipif(not ARM64_PYTHON.is_file(), reason=f"no arm64 Python under qemu at {ARM64_PYTHON} (made by "
                                                       ".ci/arm64-python.sh as root)")
def test_a_bundle_judged_on_arm_kernels_under_emulation(default_run, tmp_path):
    """The default's ort-cpu int8 bundle run by onnxruntime's aarch64 kernels (an arm64 Python under
    qemu-aarch64 as the device's interpreter): its test split judged there by the bundle's contract, the
    record an emulator's figure on aarch64, never a device's."""
    bundle = tmp_path / "ort-cpu"
    shutil.copytree(default_run.output / "ort-cpu", bundle)
    work = _work_for(bundle, default_run, tmp_path)
    arm = DeviceSpec(local=True, python=str(ARM64_PYTHON), workdir=str(tmp_path / "arm"), name="arm64-qemu")
    done = measure_bundle(bundle, arm, work=work)
    rec = done.record
    assert rec["fingerprint"]["machine"] == "aarch64" and rec["figure"] == "emulator"
    assert rec["fingerprint"]["runtime"]["onnxruntime"]
    assert rec["accuracy"]["samples"] == len(default_run.prepared.dataset.test)
    assert done.within, rec["accuracy"]["line"]
    assert not verify_files(bundle)
