"""A device reached over SSH with the user's own OpenSSH client (`ssh`, `scp`): ~/.ssh/config, agents and jump
hosts work as they do in the user's shell. Never asks for a password (BatchMode): keys or an agent only."""

from __future__ import annotations

import shlex
from pathlib import Path

from edgebundle.devices.base import Ran, Remote, call, checked

CONNECT_TIMEOUT_S = 15


class SshDevice(Remote):
    kind = "ssh"

    def _options(self, port_flag: str) -> list[str]:
        s = self.spec
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
        for o in s.ssh_options:
            opts += ["-o", o]
        if s.port:
            opts += [port_flag, str(s.port)]
        if s.identity_file:
            opts += ["-i", str(Path(s.identity_file).expanduser())]
        return opts

    def _ssh(self, command: str, *, what: str, timeout: float | None = None) -> Ran:
        argv = ["ssh", *self._options("-p"), self.spec.ssh, command]
        return call(argv, what=what, device=self.spec.label, timeout=timeout or self.spec.timeout_s)

    def push(self, files: list[Path], remote_dir: str) -> None:
        checked(self._ssh(f"mkdir -p {shlex.quote(remote_dir)}", what="mkdir", timeout=CONNECT_TIMEOUT_S * 4),
                what="connecting (ssh)", device=self.spec.label)
        self.reached = True  # from here on there is a folder to clean up
        self._scp([str(f) for f in files], f"{self.spec.ssh}:{remote_dir}/", what="copying files to it (scp)")

    def _scp(self, sources: list[str], dest: str, *, what: str) -> None:
        """scp (SFTP underneath since OpenSSH 9); a server without the SFTP subsystem gets the legacy protocol."""
        argv = ["scp", "-q", *self._options("-P"), *sources, dest]
        ran = call(argv, what=what, device=self.spec.label, timeout=self.spec.timeout_s)
        if ran.returncode != 0 and "connection closed" in ran.stderr.lower():
            ran = call(["scp", "-O", *argv[1:]], what=what, device=self.spec.label, timeout=self.spec.timeout_s)
        checked(ran, what=what, device=self.spec.label)

    def run(self, argv: list[str], *, cwd: str, timeout: float | None = None) -> Ran:
        argv = [*shlex.split(self.spec.python), *argv[1:]] if argv and argv[0] == "python" else argv
        command = f"cd {shlex.quote(cwd)} && {' '.join(shlex.quote(a) for a in argv)}"
        return self._ssh(command, what=" ".join(argv[:2]), timeout=timeout)

    def pull(self, remote_files: list[str], local_dir: Path) -> None:
        self._scp([f"{self.spec.ssh}:{f}" for f in remote_files], f"{local_dir}/", what="copying results back (scp)")

    def remove(self, remote_dir: str) -> None:
        self._ssh(f"rm -rf {shlex.quote(remote_dir)}", what="cleaning up", timeout=CONNECT_TIMEOUT_S * 4)
