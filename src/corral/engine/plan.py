"""A launch plan: a VM spec with every path and choice resolved, ready to become a QEMU command line.

The host agent builds it (it knows where disks and sockets live); the engine only renders and runs it. Keeping
the plan free of decisions makes the command line a pure function, tested with golden files.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class DiskPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: str  # QMP node name, e.g. disk0; disk0 is the boot disk
    path: Path
    format: str = "qcow2"
    read_only: bool = False
    bus: str | None = None  # a data disk's own hotplug port (see LaunchPlan.disk_ports), so it can be removed live


class NicPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str  # net0, net1...: "net" + the NIC's slot
    mac: str
    mode: str = "user"  # "user" (QEMU's NAT) or "tap" (a TAP device the host made on a bridge)
    ifname: str | None = None  # the TAP's name, for mode "tap"
    bridge: str | None = None  # the bridge the host plugs the TAP into (QEMU itself never sees it)
    # user-mode port forwards, QEMU's hostfwd syntax: "tcp:127.0.0.1:40123-:22"
    forwards: tuple[str, ...] = ()
    bus: str | None = None  # the hotplug port the NIC sits on, so it can be removed while the guest runs


class KernelBoot(BaseModel):
    model_config = ConfigDict(frozen=True)

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


class UefiFirmware(BaseModel):
    """OVMF as QEMU's two flash chips: the code, shared by every VM and read-only, and this VM's own variable
    store (boot entries, settings), writable and kept with the VM. qcow2 so internal snapshots can include it."""

    model_config = ConfigDict(frozen=True)

    code: Path
    vars: Path
    vars_format: str = "qcow2"


class LaunchPlan(BaseModel):
    """Everything QEMU needs for one VM, with no defaults left to guess."""

    model_config = ConfigDict(frozen=True)

    name: str
    uuid: str
    run_dir: Path  # sockets, logs and the runtime record live here
    accel: str  # "tcg" or "kvm"
    machine: str = "q35"
    cpus: int = 1
    memory_mib: int = 256
    kernel_boot: KernelBoot | None = None
    uefi: UefiFirmware | None = None  # None: SeaBIOS, QEMU's built-in firmware
    disks: tuple[DiskPlan, ...] = ()
    nics: tuple[NicPlan, ...] = ()
    guest_agent: bool = True
    qemu_binary: str = "qemu-system-x86_64"
    loadvm: str | None = None  # start from this internal snapshot (disks, RAM and devices)
    # Guest RAM in a file: shared (a forkable parent) or a private copy-on-write mapping (a fork's child).
    ram_file: Path | None = None
    ram_shared: bool = True
    incoming: bool = False  # wait for a migration stream (a fork's child) instead of booting
    tb_size_mib: int | None = None  # TCG translation cache size
    extra_args: tuple[str, ...] = ()  # e.g. the sandbox options, decided by the host
    # PCIe root ports made at start for NICs (present and hot-added later): on q35 a device can only be
    # hot-plugged into, or removed from, a port of its own.
    hotplug_ports: tuple[str, ...] = ()
    # Root ports for data disks (one each, present or hot-added later), packed eight to a slot.
    disk_ports: tuple[str, ...] = ()
    max_cpus: int | None = None  # CPU slots for hot-plug (-smp N,maxcpus=M); None: just ``cpus``
    balloon: bool = False  # a virtio-balloon device, so memory can be given back and taken again live

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def guest_agent_socket(self) -> Path:
        return self.run_dir / "qga.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def stderr_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def runtime_record(self) -> Path:
        return self.run_dir / "runtime.json"
