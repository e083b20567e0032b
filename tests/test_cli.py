"""CLI: bad input gives one clear line, exit code 2, and no bundle folder."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import default_dict
from edgebundle.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

QUICK = {"train": {"epochs": 1}, "distill": {"epochs": 1}}


def _write(tmp_path, mutate) -> Path:
    d = default_dict()
    d["stages"].update(QUICK)
    d["output"] = str(tmp_path / "out")
    mutate(d)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _set(path, value):
    def mutate(d):
        node = d
        *parents, leaf = path
        for k in parents:
            node = node[k]
        node[leaf] = value
    return mutate


CASES = {
    "unknown key": (_set(["stages", "prune", "ratoi"], 0.3), r"unknown key 'stages\.prune\.ratoi'"),
    "wrong type": (_set(["stages", "prune", "ratio"], "half"), r"stages\.prune\.ratio"),
    "factory not importable": (_set(["model", "factory"], "no_such_module:net"), r"cannot import 'no_such_module'"),
    "factory not a module": (_set(["model"], {"factory": "factories:not_a_module"}), r"not a torch\.nn\.Module"),
    "input the model rejects": (_set(["model"], {"factory": "factories:rgb_only"}),
                                r"the model rejects input 'image' \[1, 1, 8, 8\]"),
    "op the exporter cannot handle": (_set(["model"], {"factory": "factories:custom_op_net"}),
                                      r"stage 'export' failed \(after teacher, prune, distill\).*opaque_scale"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_2_no_bundle(tmp_path, case):
    mutate, pattern = CASES[case]
    recipe = _write(tmp_path, mutate)
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert re.search(pattern, lines[0]), lines[0]
    out = tmp_path / "out"
    if out.exists():  # at most the stage cache of what ran before the failure; never a bundle
        assert {p.name for p in out.iterdir()} <= {".work", ".locks"}, list(out.iterdir())
        assert any(p.name == "artifact.json" for p in out.rglob("*")), "a folder with nothing but locks was left"
    if case in ("unknown key", "wrong type", "factory not importable", "factory not a module"):
        assert not out.exists()  # it failed before making anything: nothing is left


def test_missing_recipe(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"error: recipe not found: {tmp_path / 'missing.yaml'}"]


def test_output_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("not a folder")
    res = runner.invoke(app, ["run", "-o", str(f)])
    assert res.exit_code == 2 and "is not a folder" in res.output


def test_recipe_command_prints_loadable_default(tmp_path):
    res = runner.invoke(app, ["recipe"])
    assert res.exit_code == 0
    p = tmp_path / "r.yaml"
    p.write_text(res.output)
    from edgebundle.core.recipe import load_recipe

    assert load_recipe(p).name == "digits-cnn"
    # the printed recipe asks for the real default: int8 only where it is faster (a copy ships no slower int8)
    assert [t.options["precision"] for t in load_recipe(p).targets] == ["auto", "auto"]


def test_readme_main_command_runs(default_run, tmp_path):
    """`edgebundle run` (the README's first command), as a real process, reusing the session's stage cache
    (the embedded default asks for precision auto: each target builds both and ships the faster)."""
    import json
    import shutil

    out = tmp_path / "bundles"
    shutil.copytree(default_run.output / ".work", out / ".work", ignore=shutil.ignore_patterns(".lock*"))
    res = subprocess.run([sys.executable, "-m", "edgebundle.cli", "run", "-o", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(cached)" in res.stdout and "ort-cpu" in res.stdout and "openvino" in res.stdout
    assert "Statistics collection" not in res.stdout + res.stderr  # NNCF's bars stay out unless --debug
    for target in ("ort-cpu", "openvino"):
        m = json.loads((out / target / "manifest.json").read_text())
        assert m["target"]["precision"] in ("int8", "fp32")
        assert m["quantization"]["precision_choice"]["asked"] == "auto"


def test_a_run_logged_to_a_file_shows_each_stage_and_epoch_as_it_happens(tmp_path):
    """stdout to a file (a CI log): a timestamped line when each stage starts and ends, and one per epoch of
    training and distillation, written while the run works, not at its end."""
    import time

    def mutate(d):
        d["stages"].update({"train": {"epochs": 2}, "distill": {"epochs": 3}})
        d["targets"] = [{"name": "ort-cpu", "options": {"precision": "fp32"}, "measure": {"iterations": 10},
                         "max_accuracy_drop": 100.0}]
    recipe = _write(tmp_path, mutate)
    log = tmp_path / "log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgebundle.cli", "run", str(recipe)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        first = None
        while proc.poll() is None:
            if first is None and "teacher" in log.read_text():
                first = log.read_text()
            time.sleep(0.2)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert first is not None and re.search(r"^\d\d:\d\d:\d\d teacher \(load / train\): started$", first, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d teacher \(load / train\): epoch 2/2, val_accuracy ", text, re.M)
    assert len(re.findall(r"^\d\d:\d\d:\d\d distill .*: epoch \d/3, ", text, re.M)) == 3
    assert re.search(r"^\d\d:\d\d:\d\d build:ort-cpu: done in \d", text, re.M)
    assert "\x1b[" not in text  # no terminal escapes in a log


def test_third_party_noise_is_kept_out_of_a_normal_run():
    """torchao's "Failed to load ..._C_mxfp8.so" (CUDA kernels a CPU build never loads) and torch's pytree notes
    print on import; the CLI quiets those loggers unless --debug, and turns Hugging Face's load bars off."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed (the mobile extra)")
    code = ("import sys; from edgebundle.cli import quiet_third_parties\n"
            "if sys.argv[1] == 'quiet': quiet_third_parties()\n"
            "import torchao, os; print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))")
    loud = subprocess.run([sys.executable, "-c", code, "loud"], capture_output=True, text=True, timeout=300)
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "1", quiet.stderr[-1000:]
    assert "Failed to load" not in quiet.stderr and "is an Enum subclass" not in quiet.stderr, quiet.stderr
    if "Failed to load" not in loud.stderr and "is an Enum subclass" not in loud.stderr:
        pytest.skip("this torchao prints nothing on import here: nothing to quiet")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"python -m pytest[^\n`]*", readme)
    assert m, "README must give the test command"
    assert m.group(0).strip() in ci


def test_messages_with_brackets_are_printed_verbatim(tmp_path):
    """Rich markup must not eat bracketed text such as `edgebundle[tensorrt]` or a path like `a[b].yaml`."""
    missing = tmp_path / "recipe[x].yaml"
    res = runner.invoke(app, ["run", str(missing)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"error: recipe not found: {missing}"]
