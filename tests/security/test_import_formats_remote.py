"""OVA export and import over HTTPS as a tenant (downloaded and uploaded, never a host path), and a libvirt domain
XML refused over HTTPS: its <source file=...> would name files on the daemon's host (docs/import.md)."""

from __future__ import annotations

import stat
from pathlib import Path

from tests.conftest import unique


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_a_tenant_exports_an_ova_and_imports_it_back(tenants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    vm = unique("ova")
    made = tenants.cli_as("pa-admin", "vm", "create", vm, "--image", "tiny", "--start", "--wait")
    assert made.returncode == 0, made.stderr
    wrote = tenants.cli_as("pa-admin", "vm", "exec", vm, "--", "sh", "-c", "echo remote-ova > /root/m; sync")
    assert wrote.returncode == 0, wrote.stderr
    ova = tmp_path / "out.ova"
    exported = tenants.cli_as("pa-admin", "vm", "export", vm, str(ova))
    assert exported.returncode == 0, exported.stderr
    assert "downloading out.ova: 100%" in exported.stderr, exported.stderr
    assert stat.S_IMODE(ova.stat().st_mode) == 0o600
    assert _files(tenants.daemon.home / "exports" / "pa") == set()  # deleted once downloaded
    copy = unique("back")
    imported = tenants.cli_as("pa-admin", "vm", "import", str(ova), "--name", copy, "--start")
    assert imported.returncode == 0, imported.stderr
    assert "uploading out.ova: 100%" in imported.stderr
    assert _files(tenants.daemon.home / "uploads" / "pa") == set()  # consumed by the import
    seen = tenants.cli_as("pa-admin", "vm", "exec", copy, "--", "cat", "/root/m")
    assert seen.returncode == 0 and "remote-ova" in seen.stdout, seen.stderr
    for gone in (vm, copy):
        tenants.cli_as("pa-admin", "vm", "delete", gone, "--force")


def test_a_domain_xml_is_refused_over_https_before_it_is_read(tenants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    xml = tmp_path / "steal.xml"
    xml.write_text(
        "<domain type='kvm'><name>steal</name><memory>65536</memory><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        "<source file='/etc/shadow'/><target dev='vda'/></disk></devices></domain>"
    )
    before = {part: _files(tenants.daemon.home / part) for part in ("images", "pools")}
    result = tenants.cli_as("pa-admin", "vm", "import", str(xml))
    assert result.returncode != 0 and "for the local admin" in result.stderr, result.stderr
    assert "root:" not in result.stderr
    assert {part: _files(tenants.daemon.home / part) for part in ("images", "pools")} == before
    with tenants.https("pa-admin") as client:
        assert [v for v in client.get("/vms").json() if v["name"] == "steal"] == []
