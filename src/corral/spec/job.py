"""Jobs: every long operation is one, so the CLI, the API and later the web UI can show and wait on it."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(StrEnum):
    VM_CREATE = "vm.create"
    VM_START = "vm.start"
    VM_STOP = "vm.stop"
    VM_RESTART = "vm.restart"
    VM_PAUSE = "vm.pause"
    VM_RESUME = "vm.resume"
    VM_DELETE = "vm.delete"
    VM_EXEC = "vm.exec"
    IMAGE_BUILD = "image.build"
    IMAGE_IMPORT = "image.import"
    IMAGE_DELETE = "image.delete"
    VOLUME_CREATE = "volume.create"
    VOLUME_RESIZE = "volume.resize"
    VOLUME_DELETE = "volume.delete"
    SNAPSHOT_CREATE = "snapshot.create"
    SNAPSHOT_REVERT = "snapshot.revert"
    SNAPSHOT_DELETE = "snapshot.delete"
    VM_CLONE = "vm.clone"
    VM_FORK = "vm.fork"
    TEMPLATE_CREATE = "template.create"
    TEMPLATE_DELETE = "template.delete"
    NETWORK_CREATE = "network.create"
    NETWORK_DELETE = "network.delete"
    VM_NIC_ADD = "vm.nic-add"
    VM_NIC_REMOVE = "vm.nic-remove"
    VM_PORT_FORWARD = "vm.port-forward"
    VM_RESIZE = "vm.resize"
    VM_DISK_ADD = "vm.disk-add"
    VM_DISK_REMOVE = "vm.disk-remove"
    VM_MIGRATE = "vm.migrate"  # the source host's half, which the user follows
    VM_MIGRATE_IN = "vm.migrate-in"  # the destination host's half
    HOST_DRAIN = "host.drain"
    BACKUP_CREATE = "backup.create"
    BACKUP_DELETE = "backup.delete"
    BACKUP_RESTORE = "backup.restore"
    BACKUP_VERIFY = "backup.verify"
    VM_REPLICATE = "vm.replicate"  # the VM's host: copy what changed to the partner (corral.cluster.replication)
    VM_REPLICA_RECEIVE = "vm.replica-receive"  # the partner: take the copy in and apply it to the replica
    VM_REPLICA_REMOVE = "vm.replica-remove"  # the partner: remove a replica's files
    VM_FAILOVER = "vm.failover"  # the partner: make the replica the VM's disks and start it there
    VM_EXPORT = "vm.export"
    VM_IMPORT = "vm.import"
