"""Render a launch plan as a QEMU command line: one small function per device, like virtinst's device classes."""

from __future__ import annotations

from corral.engine.plan import DiskPlan, KernelBoot, LaunchPlan, NicPlan, UefiFirmware

GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
UEFI_CODE_NODE = "uefi-code"
UEFI_VARS_NODE = "uefi-vars"  # also a node internal snapshots include
BALLOON_ID = "balloon0"
DISK_PORT_FIRST_SLOT = 0x18  # far above the slots QEMU hands out in order (about a dozen devices here)
DISK_PORT_FIRST_CHASSIS = 32  # NIC ports use chassis 1..8


def _opts(**options: object) -> str:
    """QEMU's key=value list; commas inside a value are doubled, as QEMU's option parser requires."""
    parts = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key.replace('_', '-')}={str(value).replace(',', ',,')}")
    return ",".join(parts)


def memory_backend_args(plan: LaunchPlan) -> list[str]:
    if plan.ram_file is None:
        return []
    backend = _opts(
        qom_type="memory-backend-file",
        id="ram0",
        size=f"{plan.memory_mib}M",
        mem_path=plan.ram_file,
        share=plan.ram_shared,
    )
    return ["-object", backend]


def machine_args(plan: LaunchPlan) -> list[str]:
    cpu = "host" if plan.accel == "kvm" else "max"
    machine = _opts(type=plan.machine)
    accel = plan.accel if plan.accel != "tcg" or not plan.tb_size_mib else f"tcg,tb-size={plan.tb_size_mib}"
    if plan.machine in ("q35", "pc"):
        machine += ",hpet=off"
    if plan.ram_file is not None:
        machine += ",memory-backend=ram0"
    if plan.uefi is not None:
        machine += f",pflash0={UEFI_CODE_NODE},pflash1={UEFI_VARS_NODE}"
    return [
        *memory_backend_args(plan),
        "-machine", machine,
        "-accel", accel,
        "-cpu", cpu,
        "-smp", smp_option(plan),
        "-m", f"{plan.memory_mib}M",
        "-uuid", plan.uuid,
    ]  # fmt: skip


def smp_option(plan: LaunchPlan) -> str:
    """``N`` or ``N,maxcpus=M``: the extra slots are what `device_add` of a CPU fills on a running VM."""
    if plan.max_cpus is None or plan.max_cpus <= plan.cpus:
        return str(plan.cpus)
    return f"{plan.cpus},maxcpus={plan.max_cpus}"


def balloon_args(plan: LaunchPlan) -> list[str]:
    """The balloon that `vm set --memory` inflates and deflates. free-page-reporting hands pages the guest
    frees back to the host on its own; deflate-on-oom lets a guest in trouble take a little back (1 MiB per
    OOM event in Linux) rather than kill a process, which the cgroup's overhead margin absorbs."""
    if not plan.balloon:
        return []
    return ["-device", _opts(driver="virtio-balloon-pci", id=BALLOON_ID, free_page_reporting=True, deflate_on_oom=True)]


def disk_port_args(plan: LaunchPlan) -> list[str]:
    """Disk root ports at fixed addresses, eight functions of one slot each (as libvirt packs them), so 16
    ports cost two of pcie.0's 32 slots and never move the devices QEMU places by itself."""
    args: list[str] = []
    for index, port in enumerate(plan.disk_ports):
        slot, function = DISK_PORT_FIRST_SLOT + index // 8, index % 8
        args += [
            "-device",
            _opts(
                driver="pcie-root-port",
                id=port,
                chassis=DISK_PORT_FIRST_CHASSIS + index,
                bus="pcie.0",
                addr=f"{slot:#x}.{function:#x}",
                multifunction=function == 0 or None,
            ),
        ]
    return args


def base_args(plan: LaunchPlan) -> list[str]:
    return [
        plan.qemu_binary,
        "-name", _opts(guest=plan.name, debug_threads=True),
        "-nodefaults", "-no-user-config",
        "-display", "none", "-vga", "none",
    ]  # fmt: skip


def firmware_args(uefi: UefiFirmware | None) -> list[str]:
    """OVMF's flash chips as block nodes the machine's pflash0/pflash1 properties name (what libvirt does; the
    older ``-drive if=pflash`` makes the same devices). No options at all means SeaBIOS."""
    if uefi is None:
        return []
    code_file, vars_file = f"{UEFI_CODE_NODE}-file", f"{UEFI_VARS_NODE}-file"
    return [
        "-blockdev", _opts(driver="file", filename=uefi.code, node_name=code_file, read_only=True),
        "-blockdev", _opts(driver="raw", file=code_file, node_name=UEFI_CODE_NODE, read_only=True),
        "-blockdev", _opts(driver="file", filename=uefi.vars, node_name=vars_file),
        "-blockdev", _opts(driver=uefi.vars_format, file=vars_file, node_name=UEFI_VARS_NODE),
    ]  # fmt: skip


def kernel_args(boot: KernelBoot | None) -> list[str]:
    if boot is None:
        return []
    args = ["-kernel", str(boot.kernel)]
    if boot.initrd is not None:
        args += ["-initrd", str(boot.initrd)]
    if boot.cmdline:
        args += ["-append", boot.cmdline]
    return args


def disk_blockdev_options(disk: DiskPlan) -> list[dict[str, object]]:
    """The file node and the format node on it, as QMP's blockdev-add takes them; the command line renders the
    same dictionaries, so a hot-added disk is the disk a restart gives."""
    file_node = f"{disk.node}-file"
    read_only = disk.read_only or None
    return [
        {"driver": "file", "filename": str(disk.path), "node-name": file_node, "read-only": read_only},
        {"driver": disk.format, "file": file_node, "node-name": disk.node, "read-only": read_only},
    ]


def disk_device_options(disk: DiskPlan, boot_index: int | None = None) -> dict[str, object]:
    return {
        "driver": "virtio-blk-pci",
        "drive": disk.node,
        "id": f"{disk.node}-dev",
        "bootindex": boot_index,
        "bus": disk.bus,
    }


def disk_args(disk: DiskPlan, boot_index: int | None) -> list[str]:
    args: list[str] = []
    for node in disk_blockdev_options(disk):
        args += ["-blockdev", _opts(**{key.replace("-", "_"): value for key, value in node.items()})]
    return [*args, "-device", _opts(**disk_device_options(disk, boot_index))]


def netdev_options(nic: NicPlan) -> dict[str, object]:
    """The netdev as QMP's netdev_add takes it; the command line renders the same dictionary."""
    if nic.mode == "tap":
        # vhost-net aborts QEMU on these hosts (no /dev/vhost-net) and gains nothing under TCG.
        return {"type": "tap", "id": nic.id, "ifname": nic.ifname, "script": "no", "downscript": "no"}
    return {"type": nic.mode, "id": nic.id}


def nic_device_options(nic: NicPlan) -> dict[str, object]:
    return {"driver": "virtio-net-pci", "netdev": nic.id, "mac": nic.mac, "id": f"{nic.id}-dev", "bus": nic.bus}


def nic_args(nic: NicPlan) -> list[str]:
    netdev = _opts(**netdev_options(nic)) + "".join(f",hostfwd={forward}" for forward in nic.forwards)
    return ["-netdev", netdev, "-device", _opts(**nic_device_options(nic))]


def hotplug_port_args(plan: LaunchPlan) -> list[str]:
    args: list[str] = []
    for index, port in enumerate(plan.hotplug_ports):
        args += ["-device", _opts(driver="pcie-root-port", id=port, chassis=index + 1, bus="pcie.0")]
    return args


def serial_args(plan: LaunchPlan) -> list[str]:
    """The serial console goes to a socket (for `vm console`) and is logged to a file whether or not anyone is
    attached, so `vm logs` and crash reports always have the guest's last words."""
    return [
        "-chardev", _opts(
            backend="socket", id="serial0", path=plan.console_socket, server=True, wait=False,
            logfile=plan.serial_log, logappend=True,
        ),
        "-serial", "chardev:serial0",
    ]  # fmt: skip


def guest_agent_args(plan: LaunchPlan) -> list[str]:
    if not plan.guest_agent:
        return []
    return [
        "-chardev", _opts(backend="socket", id="qga0", path=plan.guest_agent_socket, server=True, wait=False),
        "-device", _opts(driver="virtio-serial-pci", id="vser0"),
        "-device", _opts(driver="virtserialport", chardev="qga0", name=GUEST_AGENT_PORT, id="qga0-port"),
    ]  # fmt: skip


def monitor_args(plan: LaunchPlan) -> list[str]:
    return ["-qmp", f"unix:{plan.qmp_socket},server=on,wait=off"]


def build_argv(plan: LaunchPlan) -> list[str]:
    """The whole command line, in a stable order so golden-file tests can compare it."""
    argv = base_args(plan) + machine_args(plan) + firmware_args(plan.uefi) + kernel_args(plan.kernel_boot)
    argv += disk_port_args(plan)  # before the disks that sit on them; fixed addresses, so nothing else moves
    for index, disk in enumerate(plan.disks):
        boot_index = 0 if index == 0 and plan.kernel_boot is None else None
        argv += disk_args(disk, boot_index)
    argv += hotplug_port_args(plan)
    for nic in plan.nics:
        argv += nic_args(nic)
    argv += serial_args(plan) + guest_agent_args(plan) + balloon_args(plan) + monitor_args(plan)
    if plan.loadvm:
        argv += ["-loadvm", plan.loadvm]
    if plan.incoming:
        argv += ["-incoming", "defer"]
    return argv + list(plan.extra_args)
