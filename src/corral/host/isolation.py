"""Putting each VM's QEMU in its own box: a cgroup with CPU and memory limits, its own uid, seccomp.

The building blocks are in cgroups.py and sandbox.py (docs/isolation.md); this module decides, per launch,
which files are the VM's own and which are shared bases, and gives the launcher the Popen hook and the
extra QEMU options. Isolation needs root; without it (or with ``isolation = false``) VMs run as the daemon does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from corral.config import Settings
from corral.engine import qemu_img
from corral.engine.plan import LaunchPlan
from corral.errors import CorralError
from corral.host import cgroups, sandbox
from corral.spec.vm import VMSpec
from corral.store.db import Store
from corral.store.models import VM

log = logging.getLogger("corral.agent")
MiB = 1 << 20


@dataclass
class Box:
    """What a launch gets: QEMU options, a hook run in the child before exec, and the cgroup to clean up."""

    extra_args: list[str]
    preexec: Callable[[], None] | None
    cgroup: cgroups.VMCgroup | None


class Isolation:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.enabled = settings.isolation and os.geteuid() == 0
        self.driver: cgroups.CgroupDriver | None = None
        self.gid: int | None = None
        if not self.enabled:
            return
        try:
            self.driver = cgroups.detect()
        except CorralError as exc:
            log.warning("no cgroup limits for VMs: %s", exc)
        try:
            _, self.gid = sandbox.ensure_qemu_user()
        except (CorralError, OSError) as exc:
            log.warning("QEMU will not run under its own uid: %s", exc)

    def _uid(self, vm_id: str) -> int:
        """The VM's uid, from a slot allocated once and kept in the store."""
        with self.store.session() as session:
            vm = session.get(VM, vm_id)
            if vm.uid_slot is None:
                taken = session.scalar(select(func.max(VM.uid_slot)))
                vm.uid_slot = 0 if taken is None else taken + 1
            slot = vm.uid_slot
        return sandbox.uid_for_vm(slot)

    def vm_uid(self, vm_id: str) -> int | None:
        """The uid the VM's QEMU ends up running as, None when it keeps the daemon's."""
        return self._uid(vm_id) if self.enabled and self.gid is not None else None

    def _limits(self, vm_id: str, plan: LaunchPlan) -> cgroups.Limits:
        with self.store.reading() as session:
            vm = session.get(VM, vm_id)
            spec = VMSpec.model_validate(vm.spec) if vm is not None else None
        # The memory limit follows the balloon's target (spec.memory), not the RAM QEMU starts with: headroom
        # for live growth (max_memory) is not the VM's until `vm set --memory` gives it (see docs/resize.md).
        guest_ram = spec.memory if spec is not None else plan.memory_mib * MiB
        return cgroups.Limits.for_vm(
            plan.cpus, guest_ram, tb_size=(plan.tb_size_mib or 0) * MiB,
            cpus=spec.cpu_limit if spec else None,
            cpu_weight=spec.cpu_weight if spec and spec.cpu_weight else cgroups.DEFAULT_CPU_WEIGHT,
        )

    def prepare(self, vm_id: str, plan: LaunchPlan) -> Box:
        if not self.enabled:
            return Box([], None, None)
        cgroup = None
        if self.driver is not None:
            limits = self._limits(vm_id, plan)
            cgroup = cgroups.VMCgroup.create(self.driver, f"vm-{vm_id[:16]}", limits)
        args: list[str] = []
        if self.gid is not None:
            uid = self._uid(vm_id)
            own = [plan.run_dir, *(d.path for d in plan.disks if not d.read_only)]
            if plan.uefi is not None:
                own.append(plan.uefi.vars)  # the VM's own firmware variables; OVMF's code stays the package's
            if plan.ram_file is not None and plan.ram_shared:
                own.append(plan.ram_file)
            shared = [d.path for d in plan.disks if d.read_only] + self._backing_files(plan)
            sandbox.prepare_paths([p for p in own if p.exists()], [p for p in shared if p.exists()], uid, self.gid)
            args = sandbox.sandbox_args(uid, self.gid)
        hook = cgroup.preexec() if cgroup is not None else None

        def enter() -> None:
            os.umask(0o077)  # what QEMU creates later is the VM's alone
            if hook is not None:
                hook()

        return Box(args, enter, cgroup)

    def _backing_files(self, plan: LaunchPlan) -> list[Path]:
        files: list[Path] = []
        for disk in plan.disks:
            if disk.format != "qcow2":
                continue
            facts = qemu_img.info(disk.path, self.settings.qemu_img_binary)
            backing = facts.get("full-backing-filename") or facts.get("backing-filename")
            while backing:
                path = Path(backing)
                files.append(path)
                facts = qemu_img.info(path, self.settings.qemu_img_binary)
                backing = facts.get("full-backing-filename") or facts.get("backing-filename")
        return files

    def release(self, vm_id: str) -> None:
        if self.driver is None:
            return
        try:
            cgroups.VMCgroup(self.driver, f"vm-{vm_id[:16]}", cgroups.Limits()).destroy(timeout=3.0, kill=False)
        except CorralError as exc:
            log.warning("VM %s: cgroup not removed: %s", vm_id, exc)
