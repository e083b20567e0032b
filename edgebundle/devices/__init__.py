"""Devices a bundle is measured on: this machine, a machine over SSH, a phone over adb. Each pushes files, runs
a command with a time limit, pulls files (edgebundle.devices.base.Device)."""

from edgebundle.core.recipe import DeviceSpec
from edgebundle.devices.base import Device, Ran


def open_device(spec: DeviceSpec) -> Device:
    if spec.kind == "ssh":
        from edgebundle.devices.ssh import SshDevice

        return SshDevice(spec)
    if spec.kind == "adb":
        from edgebundle.devices.adb import AdbDevice

        return AdbDevice(spec)
    from edgebundle.devices.local import LocalDevice

    return LocalDevice(spec)


__all__ = ["Device", "Ran", "open_device"]
