"""The registry of job handlers: which coroutine runs each job kind. The handlers live in the job modules
(``*_jobs.py``), each a thin step list over the lifecycle and storage modules; adding a kind adds a line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.host import (
    backup_jobs,
    clone_jobs,
    export_jobs,
    fork_jobs,
    image_jobs,
    move_jobs,
    network_jobs,
    replication_jobs,
    resize_jobs,
    snapshot_jobs,
    vm_jobs,
    volume_jobs,
)
from corral.spec.job import JobKind

if TYPE_CHECKING:
    from corral.host.job_context import Handler


def build_handlers() -> dict[str, Handler]:
    return {
        JobKind.VM_CREATE: vm_jobs.vm_create,
        JobKind.VM_START: vm_jobs.vm_start,
        JobKind.VM_STOP: vm_jobs.vm_stop,
        JobKind.VM_RESTART: vm_jobs.vm_restart,
        JobKind.VM_PAUSE: vm_jobs.vm_pause,
        JobKind.VM_RESUME: vm_jobs.vm_resume,
        JobKind.VM_DELETE: vm_jobs.vm_delete,
        JobKind.VM_EXEC: vm_jobs.vm_exec,
        JobKind.VOLUME_CREATE: volume_jobs.volume_create,
        JobKind.VOLUME_RESIZE: volume_jobs.volume_resize,
        JobKind.VOLUME_DELETE: volume_jobs.volume_delete,
        JobKind.IMAGE_BUILD: image_jobs.build,
        JobKind.IMAGE_IMPORT: image_jobs.import_image,
        JobKind.IMAGE_DELETE: image_jobs.delete,
        JobKind.VM_CLONE: clone_jobs.vm_clone,
        JobKind.VM_FORK: fork_jobs.fork,
        JobKind.TEMPLATE_CREATE: clone_jobs.template_create,
        JobKind.TEMPLATE_DELETE: clone_jobs.template_delete,
        JobKind.SNAPSHOT_CREATE: snapshot_jobs.create,
        JobKind.SNAPSHOT_REVERT: snapshot_jobs.revert,
        JobKind.SNAPSHOT_DELETE: snapshot_jobs.delete,
        JobKind.NETWORK_CREATE: network_jobs.network_create,
        JobKind.NETWORK_DELETE: network_jobs.network_delete,
        JobKind.VM_NIC_ADD: network_jobs.vm_nic_add,
        JobKind.VM_NIC_REMOVE: network_jobs.vm_nic_remove,
        JobKind.VM_PORT_FORWARD: network_jobs.vm_port_forward,
        JobKind.VM_RESIZE: resize_jobs.vm_resize,
        JobKind.VM_DISK_ADD: resize_jobs.vm_disk_add,
        JobKind.VM_DISK_REMOVE: resize_jobs.vm_disk_remove,
        JobKind.VM_MIGRATE: move_jobs.vm_migrate,
        JobKind.VM_MIGRATE_IN: move_jobs.vm_migrate_in,
        JobKind.HOST_DRAIN: move_jobs.host_drain,
        JobKind.BACKUP_CREATE: backup_jobs.create,
        JobKind.BACKUP_DELETE: backup_jobs.delete,
        JobKind.BACKUP_RESTORE: backup_jobs.restore,
        JobKind.BACKUP_VERIFY: backup_jobs.verify,
        JobKind.VM_EXPORT: export_jobs.export,
        JobKind.VM_IMPORT: export_jobs.import_,
        JobKind.VM_REPLICATE: replication_jobs.replicate,
        JobKind.VM_REPLICA_RECEIVE: replication_jobs.receive,
        JobKind.VM_REPLICA_REMOVE: replication_jobs.remove,
        JobKind.VM_FAILOVER: replication_jobs.failover,
    }
