"""This machine as a device: files copied into a folder, the runner run with the recipe's Python (or this
one's). Its figures are the build host's whenever it is the machine that built the bundle."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from edgebundle.core.recipe import DeviceSpec
from edgebundle.devices.base import Ran, call


class LocalDevice:
    kind = "local"
    reached = True  # this machine

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        # "python3" (the default) is whatever PATH finds; here the interpreter running edgebundle has the runtimes.
        # A command line works too: "qemu-x86_64 -cpu Haswell .venv/bin/python" is an AVX2 machine's arithmetic
        self.python = [sys.executable] if spec.python == "python3" else shlex.split(spec.python)

    def push(self, files: list[Path], remote_dir: str) -> None:
        Path(remote_dir).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, Path(remote_dir) / Path(f).name)

    def run(self, argv: list[str], *, cwd: str, timeout: float | None = None) -> Ran:
        argv = [*self.python, *argv[1:]] if argv and argv[0] == "python" else argv
        return call(argv, what=" ".join(argv[:2]), device=self.spec.label, timeout=timeout or self.spec.timeout_s,
                    cwd=cwd)

    def pull(self, remote_files: list[str], local_dir: Path) -> None:
        for f in remote_files:
            shutil.copy2(f, Path(local_dir) / Path(f).name)

    def remove(self, remote_dir: str) -> None:
        shutil.rmtree(remote_dir, ignore_errors=True)
