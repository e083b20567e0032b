"""The Device protocol and what every device shares: a folder of its own per job, commands with time limits,
and errors that name the device."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgebundle.core.errors import DeviceError
from edgebundle.core.recipe import DeviceSpec


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str

    def last_line(self) -> str:
        lines = [x for x in (self.stderr or self.stdout).strip().splitlines() if x.strip()]
        return lines[-1].strip() if lines else f"exit status {self.returncode}"


class Device(Protocol):
    spec: DeviceSpec
    kind: str  # "local" | "ssh" | "adb"
    reached: bool  # whether a push got as far as making its folder there (what `remove` then cleans up)

    def push(self, files: list[Path], remote_dir: str) -> None:
        """Copy local files into `remote_dir` on the device (created if missing)."""

    def run(self, argv: list[str], *, cwd: str, timeout: float | None = None) -> Ran:
        """Run a command in `cwd` on the device; DeviceError when it cannot start or runs past `timeout`."""

    def pull(self, remote_files: list[str], local_dir: Path) -> None:
        """Copy files from the device into `local_dir`."""

    def remove(self, remote_dir: str) -> None:
        """Remove a folder this tool made on the device (best effort)."""


def call(argv: list[str], *, what: str, device: str, timeout: float, cwd: str | None = None) -> Ran:
    """Run a local command for a device (ssh, scp, adb, or the runner here), with its time limit."""
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise DeviceError(f"device {device}: {argv[0]} is not installed here ({what})") from e
    except subprocess.TimeoutExpired as e:
        raise DeviceError(f"device {device}: {what} ran past its time limit of {timeout:g} s") from e
    return Ran(p.returncode, p.stdout, p.stderr)


def checked(ran: Ran, *, what: str, device: str) -> Ran:
    if ran.returncode != 0:
        raise DeviceError(f"device {device}: {what} failed: {ran.last_line()}")
    return ran


class Remote:
    """What a device reached over a connection starts with: its spec, and not yet reached."""

    kind = "remote"

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.reached = False  # whether a push got as far as making the job's folder
