"""What a VM's QEMU is launched with: its row and image resolved into a LaunchPlan (image files, disk paths
inside their pool, NIC MACs, firmware, the cloud-init seed), and the disk node and port names every job that
touches a running VM's disks shares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from corral.engine.plan import DiskPlan, KernelBoot, LaunchPlan
from corral.errors import NotFound
from corral.host.firmware import check_machine, ovmf_files, uefi_firmware
from corral.host.layout import inside_pool
from corral.host.vm_nics import hotplug_ports, nic_plans
from corral.spec.firmware import Firmware, effective_firmware
from corral.spec.vm import MAX_DISKS, VMSpec
from corral.store.models import VM, Image

if TYPE_CHECKING:
    from corral.host.agent import Agent


def _project_image(name: str | None, project: str):  # type: ignore[no-untyped-def]
    """The image a VM of ``project`` boots: the project's own of that name, else the default project's catalog.
    Image names are unique per project, so another project's image of the same name is never picked."""
    return (
        select(Image)
        .where(Image.name == name, Image.project.in_([project, "default"]))
        .order_by((Image.project == "default").asc())
    )


def build_plan(agent: Agent, vm: VM) -> LaunchPlan:
    """Resolve a VM row into a launch plan: image files, disk paths inside the pool, NIC MACs."""
    spec = VMSpec.model_validate(vm.spec)
    with agent.store.session() as session:
        image = session.scalars(_project_image(spec.image, vm.project)).first()
        if image is None or image.state != "ready":
            raise NotFound(f"image {spec.image!r} of VM {vm.name} is missing", "import or build it again")
        image_dir = agent.layout.image_dir(image.id)
        details = dict(image.details or {})
        kernel_boot = None
        if image.kind == "kernel" and image.kernel_file:
            cmdline = " ".join(
                part
                for part in (
                    image.cmdline,
                    f"corral.hostname={vm.name}",
                    f"corral.machine_id={vm.id}",
                    spec.kernel_args,
                )
                if part
            )
            kernel_boot = KernelBoot(
                kernel=image_dir / image.kernel_file,
                initrd=image_dir / image.initrd_file if image.initrd_file else None,
                cmdline=cmdline,
            )
    on_q35 = agent.settings.machine.startswith("q35")
    disks = tuple(
        DiskPlan(
            node=disk_node(volume.device_index),
            path=inside_pool(agent.layout.pool(volume.pool), volume.path),
            format=volume.format,
            bus=disk_port(volume.device_index) if on_q35 and 0 < volume.device_index <= MAX_DISKS else None,
        )
        for volume in sorted(vm.volumes, key=lambda v: v.device_index)
    )
    nics = nic_plans(agent, vm, spec)
    if details.get("ssh") and nics and vm.ports.get("ssh") and nics[0].mode == "user":
        nics[0] = nics[0].model_copy(update={"forwards": (f"tcp:127.0.0.1:{vm.ports['ssh']}-:22", *nics[0].forwards)})
    if details.get("cloud_init") or spec.ssh_keys or spec.user_data:
        disks += (_seed_disk(agent, vm, spec, details),)
    uefi = None
    if effective_firmware(spec.firmware, details) == Firmware.UEFI:
        uefi = uefi_firmware(agent.settings, agent.layout.vm_run_dir(vm.id))
    assert agent.inventory is not None
    ram_file = agent.layout.ram_file(vm.id) if spec.forkable else None
    return LaunchPlan(
        ram_file=ram_file,
        tb_size_mib=agent.settings.tcg_tb_size_mib if agent.inventory.accel == "tcg" else None,
        name=vm.name,
        uuid=f"{vm.id[:8]}-{vm.id[8:12]}-{vm.id[12:16]}-{vm.id[16:20]}-{vm.id[20:32]}",
        run_dir=agent.layout.vm_run_dir(vm.id),
        accel=agent.inventory.accel,
        machine=agent.settings.machine,
        cpus=spec.cpus,
        max_cpus=spec.boot_max_cpus,
        memory_mib=spec.boot_memory >> 20,
        balloon=True,
        disk_ports=disk_ports(agent.settings.machine),
        kernel_boot=kernel_boot,
        uefi=uefi,
        disks=disks,
        nics=tuple(nics),
        hotplug_ports=hotplug_ports(agent.settings.machine),
        qemu_binary=agent.settings.qemu_binary,
    )


def disk_node(device_index: int) -> str:
    """A disk's block node: named after its device index, which it keeps for life, so the node a hot-added
    disk got is the one every later start gives it (disk0 is the root disk)."""
    return f"disk{device_index}"


def disk_port(device_index: int) -> str:
    """The root port of data disk ``device_index`` (1..MAX_DISKS), so it can be hot-removed (or hot-added)."""
    return f"diskport{device_index - 1}"


def disk_ports(machine: str) -> tuple[str, ...]:
    return tuple(disk_port(index) for index in range(1, MAX_DISKS + 1)) if machine.startswith("q35") else ()


def check_firmware(agent: Agent, vm: VM) -> None:
    """Refuse a firmware this host cannot boot when the VM is made, not at its first start: UEFI needs OVMF
    installed and a machine type with flash."""
    spec = VMSpec.model_validate(vm.spec)
    if effective_firmware(spec.firmware, image_details(agent, vm)) == Firmware.UEFI:
        check_machine(agent.settings.machine)
        ovmf_files(agent.settings)


def _seed_disk(agent: Agent, vm: VM, spec: VMSpec, details: dict[str, Any]) -> DiskPlan:
    """A NoCloud seed, made afresh at each start: the VM id is the instance id, so a clone (a new VM)
    re-runs cloud-init's per-instance steps and gets its own host keys."""
    from corral.images.cloudinit import make_seed

    run_dir = agent.layout.vm_run_dir(vm.id)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = run_dir / "seed.iso"
    make_seed(
        seed,
        instance_id=vm.id,
        hostname=vm.name,
        ssh_keys=list(spec.ssh_keys),
        user_data=spec.user_data,
        password_login=spec.password_login,
        default_user=details.get("default_user", "corral"),
    )
    return DiskPlan(node="seed", path=seed, format="raw", read_only=True)


def image_details(agent: Agent, vm: VM) -> dict[str, Any]:
    with agent.store.session() as session:
        image = session.scalars(_project_image(vm.spec.get("image"), vm.project)).first()
        return dict(image.details or {}) if image else {}
