"""Fork rules that need no VM: how a running QEMU's RAM is read from its command line, and the child's script."""

from __future__ import annotations

import subprocess
from pathlib import Path

from corral.engine.fork import ram_backing
from corral.host.fork_jobs import renew_identity_script


def test_ram_backing_tells_the_fast_path_from_the_others() -> None:
    shared = "qom-type=memory-backend-file,id=ram0,size=128M,mem-path=/dev/shm/a,,b.ram,share=on"
    assert ram_backing(["qemu", "-object", shared, "-m", "128M"]) == ("shared", Path("/dev/shm/a,b.ram"))
    private = shared.replace("share=on", "share=off")
    assert ram_backing(["qemu", "-object", private])[0] == "private"
    assert ram_backing(["qemu", "-m", "128M"]) == ("anonymous", None)
    other = "qom-type=memory-backend-file,id=other,size=1M,mem-path=/x,share=on"
    assert ram_backing(["qemu", "-object", other, "-m", "1M"]) == ("anonymous", None)


def test_the_renewal_script_is_valid_shell_and_keeps_addresses_when_asked() -> None:
    macs = ["52:54:00:00:00:01", "52:54:00:00:00:02"]
    renew = renew_identity_script("web-1", "0" * 32, macs)
    assert subprocess.run(["sh", "-n", "-c", renew]).returncode == 0
    assert all(mac in renew for mac in macs) and "udhcpc -b" in renew and "eth1" in renew
    keep = renew_identity_script("web-1", "0" * 32, macs, keep_addresses=True)
    assert subprocess.run(["sh", "-n", "-c", keep]).returncode == 0
    assert not any(mac in keep for mac in macs) and "udhcpc -b" not in keep
    assert "hostname web-1" in keep and "kill" in keep  # a new name; the DHCP clients stop
    assert "'a b'" in renew_identity_script("a b", "0" * 32, [])  # quoted, though names never have spaces
