"""Networks that span a pool's hosts (VXLAN): a control plane and two agents on one real PostgreSQL, each agent in
its own network namespace with its own address (corral.localpool), real QEMU guests of the tiny image.

h1 and h2 keep their own storage, so a live move between them copies the disks. One pool for the module: the
guests va (h1) and vb (h2) are on the NAT network ``ov`` and each on an isolated network of its own; the cross-project
test adds vc (h2) of project ``other``, on that project's own network ``ov``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.localpool import LocalPool
from tests.conftest import new_home, require


def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


class Pool(LocalPool):
    def sh(self, vm: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("vm", "exec", vm, "--", "/bin/sh", "-c", script, check=check, timeout=120)

    def ok(self, vm: str, script: str) -> bool:
        return self.sh(vm, script, check=False).returncode == 0

    def sh_in(self, project: str, vm: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("-p", project, "vm", "exec", vm, "--", "/bin/sh", "-c", script, check=check, timeout=120)

    def ok_in(self, project: str, vm: str, script: str) -> bool:
        return self.sh_in(project, vm, script, check=False).returncode == 0

    def host_sh(self, host: str, *argv: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns(host), *argv], capture_output=True, text=True, check=False
        ).stdout

    def links(self, host: str) -> list[str]:
        return [
            line.split(":")[1].strip().split("@")[0] for line in self.host_sh(host, "ip", "-o", "link").splitlines()
        ]

    def net_show(self, name: str) -> dict[str, Any]:
        return json.loads(self.cli("network", "show", name, "--json").stdout)  # type: ignore[no-any-return]

    def ip_of(self, vm: str, network: str) -> str:
        shown = json.loads(self.cli("vm", "show", vm, "--json").stdout)
        return next(nic["ip"] for nic in shown["nics"] if nic["network"] == network)  # type: ignore[no-any-return]

    def host_of(self, vm: str) -> str:
        return json.loads(self.cli("vm", "show", vm, "--json").stdout)["host"]  # type: ignore[no-any-return]

    def log_tail(self, host: str) -> str:
        """The agent's warnings and errors, for a failing assertion's message."""
        lines = self.agents[host].log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if "WARNING" in line or "ERROR" in line or "Error" in line)[-3000:]

    def has_address(self, vm: str, address: str) -> bool:
        return self.ok(vm, f"ip -4 addr | grep -q 'inet {address}/'")

    def resolve(self, vm: str, name: str, server: str) -> str | None:
        """The address busybox's nslookup in ``vm`` gets for ``name`` from the DNS server ``server``, or None."""
        out = self.sh(vm, f"nslookup {name} {server}", check=False)
        found = [line.split()[-1] for line in out.stdout.splitlines()[2:] if line.startswith("Address")]
        return found[-1] if out.returncode == 0 and found else None

    def fetch(self, host: str, port: int) -> str | None:
        """An HTTP GET to a host's address, from this machine (outside the hosts); None if nothing answers."""
        try:
            with urllib.request.urlopen(f"http://{self.address(host)}:{port}/f", timeout=5) as reply:
                return reply.read().decode().strip()  # type: ignore[no-any-return]
        except OSError:
            return None


@pytest.fixture(scope="module")
def pool(postgres, qemu_available) -> Iterator[Pool]:  # type: ignore[no-untyped-def]
    require(shutil.which("ip") is not None and shutil.which("bridge") is not None, "iproute2 is not installed")
    require(os.geteuid() == 0, "network namespaces need root")
    name = f"ovl_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    url = f"postgresql+psycopg://corral@/{name}?host={postgres.root}&port={postgres.port}"
    images = Path(new_home("ov-img-"))
    pool = Pool(url, prefix="ov", make_home=lambda host: new_home(f"ov-{host}-"), settings={"CORRAL_ACCEL": "tcg"})
    from corral.store.db import Store

    store = Store(url)
    try:
        store.migrate()
        store.close()
        pool.network()
        pool.start_control()
        pool.add_host("h1", images=images)
        pool.add_host("h2", images=images)
        pool.wait_online(["h1", "h2"])
        pool.cli("image", "build", "tiny", timeout=1800)
        pool.cli("network", "create", "ov", "--mode", "nat")
        pool.cli("network", "create", "iso-a", "--mode", "isolated")
        pool.cli("network", "create", "iso-b", "--mode", "isolated")
        for vm, host, isolated in (("va", "h1", "iso-a"), ("vb", "h2", "iso-b")):
            pool.cli(
                "vm",
                "run",
                vm,
                "--image",
                "tiny",
                "--host",
                host,
                "--memory",
                "160M",
                "--nic",
                "network=ov",
                "--nic",
                f"network={isolated}",
                timeout=400,
            )
        for vm, isolated in (("va", "iso-a"), ("vb", "iso-b")):
            for network in ("ov", isolated):
                address = pool.ip_of(vm, network)
                until(lambda vm=vm, address=address: pool.has_address(vm, address), 60, f"{vm} to get {address}")
        yield pool
    finally:
        pool.close()
        shutil.rmtree(images, ignore_errors=True)


def test_guests_on_two_hosts_share_one_segment(pool: Pool) -> None:
    shown = pool.net_show("ov")
    assert shown["hosts"] == ["h1", "h2"] and isinstance(shown["vni"], int)
    # Each host's part, as its agent's heartbeat reports it.
    until(lambda: pool.net_show("ov")["host_states"] == {"h1": "joined", "h2": "joined"}, 30, "both hosts to join")
    table = pool.cli("network", "show", "ov").stdout
    assert "h1 (joined), h2 (joined)" in table and str(shown["vni"]) in table
    a, b = pool.ip_of("va", "ov"), pool.ip_of("vb", "ov")
    # Each host has the network's VXLAN device on its bridge, flooding to the other host's registered address.
    for host, peer in (("h1", "h2"), ("h2", "h1")):
        device = f"crx{shown['id'][:8]}"
        assert device in pool.links(host), f"no VXLAN device on {host}: {pool.log_tail(host)}"
        fdb = pool.host_sh(host, "bridge", "fdb", "show", "dev", device)
        assert f"00:00:00:00:00:00 dst {pool.address(peer)} " in fdb, fdb
    assert pool.ok("va", f"ping -c 3 -W 3 {b}"), "va (h1) cannot ping vb (h2) over the overlay"
    assert pool.ok("vb", f"ping -c 3 -W 3 {a}")
    # The same address plan everywhere: each guest's own host answered DHCP with the store's reservation, and
    # each reaches the gateway on its own host.
    assert pool.ok("vb", f"ping -c 1 -W 3 {shown['gateway']}")

    # TCP data of many segments, vb's busybox httpd to va's wget (whose -T option crashes it: not used).
    pool.sh(
        "vb",
        "mkdir -p /tmp/www && echo small > /tmp/www/small && "
        "dd if=/dev/urandom of=/tmp/www/blob bs=1024 count=400 2>/dev/null && httpd -p 8080 -h /tmp/www",
    )
    small = pool.sh("va", f"wget -q -O - http://{b}:8080/small", check=False).stdout.strip()
    assert small == "small", f"a one-segment TCP exchange failed: {small!r}"
    sent = pool.sh("vb", "md5sum < /tmp/www/blob").stdout.split()[0]
    got = pool.sh("va", f"wget -q -O - http://{b}:8080/blob | md5sum", check=False).stdout.split()
    assert got and got[0] == sent, "a 400 KiB TCP transfer across the overlay did not arrive whole"


def test_isolated_networks_stay_apart_across_hosts(pool: Pool) -> None:
    vnis = {name: pool.net_show(name)["vni"] for name in ("ov", "iso-a", "iso-b")}
    assert len(set(vnis.values())) == 3, vnis
    subnet_a = pool.net_show("iso-a")["subnet"]
    target = pool.ip_of("va", "iso-a")
    # vb sends for iso-a's subnet straight out of its iso-b NIC: were the two segments joined anywhere (one VNI,
    # one bridge), va would answer ARP and ping.
    iface = pool.sh("vb", f"ip -o -4 addr | grep 'inet {pool.ip_of('vb', 'iso-b')}/' | cut -d' ' -f2").stdout.strip()
    pool.sh("vb", f"ip route replace {subnet_a} dev {iface}")
    try:
        assert not pool.ok("vb", f"ping -c 2 -W 2 {target}"), "an isolated network reached another across hosts"
    finally:
        pool.sh("vb", f"ip route del {subnet_a} dev {iface}", check=False)
    assert not pool.ok("vb", f"ping -c 2 -W 2 {pool.ip_of('va', 'ov')} -I {pool.ip_of('vb', 'iso-b')}")


def test_names_resolve_across_hosts(pool: Pool) -> None:
    """Each host's dnsmasq answers the names of the whole network, from the store, not only of its own guests
    (their DHCP never crosses the overlay, so it never saw a lease of the other host's)."""
    a, b = pool.ip_of("va", "ov"), pool.ip_of("vb", "ov")
    gateway = pool.net_show("ov")["gateway"]  # the same on both hosts: each guest asks its own host's dnsmasq
    assert pool.resolve("va", "vb", gateway) == b, f"va (h1) cannot resolve vb (h2): {pool.log_tail('h1')}"
    assert pool.resolve("vb", "va", gateway) == a
    # Names are per network: iso-a's dnsmasq knows va but not vb, a guest of another network.
    iso_gateway = pool.net_show("iso-a")["gateway"]
    assert pool.resolve("va", "va", iso_gateway) == pool.ip_of("va", "iso-a")
    assert pool.resolve("va", "vb", iso_gateway) is None


def test_another_projects_network_is_out_of_reach_across_hosts(pool: Pool) -> None:
    """vc of project ``other`` on h2, on that project's own network also named ``ov``, reaches no guest of the
    default project's ``ov`` on h1, by route or on the wire; and a guest spoofing an address on h2 is cut off
    there, before the overlay carries anything to h1."""
    pool.cli("project", "create", "other")
    pool.cli("-p", "other", "network", "create", "ov", "--mode", "nat")
    theirs = json.loads(pool.cli("-p", "other", "network", "show", "ov", "--json").stdout)
    ours = pool.net_show("ov")
    assert theirs["vni"] != ours["vni"] and theirs["subnet"] != ours["subnet"]
    pool.cli(
        "-p", "other", "vm", "run", "vc", "--image", "tiny", "--host", "h2", "--memory", "160M",
        "--nic", "network=ov", timeout=400,
    )  # fmt: skip
    c = json.loads(pool.cli("-p", "other", "vm", "show", "vc", "--json").stdout)["nics"][0]["ip"]
    until(lambda: pool.ok_in("other", "vc", f"ip -4 addr | grep -q 'inet {c}/'"), 90, "vc to get its address")
    a = pool.ip_of("va", "ov")
    assert pool.ok_in("other", "vc", f"ping -c 1 -W 3 {theirs['gateway']}")
    # Routed through vc's gateway on h2: the firewall drops traffic from one corral bridge to another.
    assert not pool.ok_in("other", "vc", f"ping -c 2 -W 2 {a}"), "project other reached project default's guest"
    # Straight onto vc's segment, as if the two were one: another VNI, so nothing of ours is there to answer.
    iface = pool.sh_in("other", "vc", f"ip -o -4 addr | grep 'inet {c}/' | cut -d' ' -f2").stdout.strip()
    pool.sh_in("other", "vc", f"ip route replace {ours['subnet']} dev {iface}")
    assert not pool.ok_in("other", "vc", f"ping -c 2 -W 2 {a}"), "project other's segment reached ours"
    assert pool.resolve("va", "vc", ours["gateway"]) is None, "a name of project other resolved on our network"
    assert not pool.ok("va", f"ping -c 2 -W 2 {c}")
    pool.cli("-p", "other", "vm", "delete", "vc", "--force", timeout=300)

    # Anti-spoofing on h2 (vb's host) for traffic bound to h1: an address vb was not given is dropped on vb's TAP.
    b = pool.ip_of("vb", "ov")
    spoofed = str(ipaddress.IPv4Network(ours["subnet"])[-2])
    iface = pool.sh("vb", f"ip -o -4 addr | grep 'inet {b}/' | cut -d' ' -f2").stdout.strip()
    pool.sh("vb", f"ip addr add {spoofed}/32 dev {iface}")
    try:
        assert not pool.ok("vb", f"ping -c 2 -W 2 -I {spoofed} {a}"), "a spoofed source crossed from h2 to h1"
        assert pool.ok("vb", f"ping -c 1 -W 3 -I {b} {a}")
    finally:
        pool.sh("vb", f"ip addr del {spoofed}/32 dev {iface}", check=False)


def test_bad_input_changes_nothing(pool: Pool) -> None:
    before = pool.cli("network", "list", "--json").stdout
    vni = pool.net_show("ov")["vni"]
    clash = pool.cli("network", "create", "dup", "--vni", str(vni), check=False)
    assert clash.returncode == 1 and f"VNI {vni} is taken" in clash.stderr, clash.stderr
    big = pool.cli("network", "create", "big", "--mtu", "1500", check=False)
    assert big.returncode == 2 and "cannot be carried by the overlay" in big.stderr and "--mtu 1450" in big.stderr
    out_of_range = pool.cli("network", "create", "far", "--vni", str(1 << 24), check=False)
    assert out_of_range.returncode == 2 and "out of range" in out_of_range.stderr
    assert pool.cli("network", "list", "--json").stdout == before


def test_a_restarted_agent_restores_the_segment(pool: Pool) -> None:
    device = next(
        name for name in pool.links("h2") if name.startswith("crx") and name.endswith(pool.net_show("ov")["id"][:8])
    )
    pool.agents["h2"].stop()
    pool.host_sh("h2", "ip", "link", "del", device)
    assert device not in pool.links("h2")
    pool.agents["h2"].start()
    pool.wait_online(["h1", "h2"])
    until(lambda: device in pool.links("h2"), 60, "the VXLAN device to be made again")
    b = pool.ip_of("vb", "ov")
    until(lambda: pool.ok("va", f"ping -c 1 -W 2 {b}"), 60, "va to reach vb again")


def test_a_host_joins_and_leaves_and_a_deleted_network_leaves_nothing(pool: Pool) -> None:
    pool.cli("network", "create", "tmpnet", "--mode", "nat")
    shown = pool.net_show("tmpnet")
    device = f"crx{shown['id'][:8]}"
    assert shown["hosts"] == [] and all(device not in pool.links(h) for h in ("h1", "h2"))
    pool.cli("vm", "create", "vt", "--image", "tiny", "--host", "h2", "--nic", "network=tmpnet", timeout=300)
    assert pool.net_show("tmpnet")["hosts"] == ["h2"]
    until(lambda: device in pool.links("h2"), 30, "h2 to join tmpnet's segment")
    until(lambda: pool.net_show("tmpnet")["host_states"] == {"h2": "joined"}, 30, "h2 to report its part")
    assert device not in pool.links("h1")
    pool.cli("vm", "delete", "vt", "--force", timeout=300)
    until(lambda: device not in pool.links("h2"), 30, "h2 to leave tmpnet's segment")
    pool.cli("network", "delete", "tmpnet")
    for host in ("h1", "h2"):
        # The delete job ran on one host; the other's reconcile loop (every 2 s) takes its part down.
        # Links and firewall rules go in the same reconcile pass, the rules a moment after the links.
        def cleaned(host: str = host) -> bool:
            rules = pool.host_sh(host, "nft", "list", "ruleset")
            gone = not {device, shown["bridge"]} & set(pool.links(host))
            return gone and shown["bridge"] not in rules and device not in rules

        until(cleaned, 30, f"{host} to clean up its links and rules")
        assert not list((pool.homes[host] / "run" / "networks").glob(f"{shown['id'][:12]}*"))
    assert not [
        line
        for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
        if "dnsmasq" in line and shown["bridge"] in line
    ]


def test_live_migration_keeps_the_address_a_transfer_the_name_and_the_forward(pool: Pool) -> None:
    b = pool.ip_of("vb", "ov")
    source = pool.host_of("vb")
    target = "h1" if source == "h2" else "h2"
    # A port forward to vb's web server, reached at its host's address from outside the hosts.
    pool.sh("vb", "mkdir -p /tmp/fwd && echo fwd-ok > /tmp/fwd/f && httpd -p 8081 -h /tmp/fwd")
    pool.cli("vm", "port-forward", "vb", "20081:8081")
    until(lambda: pool.fetch(source, 20081) == "fwd-ok", 30, f"the forward on {source}: {pool.log_tail(source)}")
    assert pool.fetch(target, 20081) is None
    # A move to a host where another VM forwards the same port is refused up front, and nothing changes.
    pool.cli("vm", "port-forward", "va", "20081:8081")
    refused = pool.cli("vm", "migrate", "vb", "--to", target, check=False)
    assert refused.returncode == 1 and "20081/tcp of its forwards is forwarded there already" in refused.stderr, (
        refused.stderr
    )
    assert pool.host_of("vb") == source and pool.fetch(source, 20081) == "fwd-ok"
    pool.cli("vm", "port-forward", "va", "--remove", "20081")
    # vb streams a numbered line every ~50 ms to va over one TCP connection, across the move (busybox nc: the
    # moving guest serves, the other reads); a ping counts what the move loses.
    pool.sh(
        "vb",
        'printf "#!/bin/sh\\ni=0; while [ \\$i -lt 100000 ]; do i=\\$((i+1)); echo \\$i; usleep 50000; done\\n" '
        "> /tmp/gen.sh && chmod +x /tmp/gen.sh && "
        "setsid nc -l -p 5002 -e /tmp/gen.sh </dev/null >/dev/null 2>&1 &",
    )
    time.sleep(1)
    pool.sh("va", f"rm -f /tmp/slow; setsid sh -c 'sleep 900 | nc {b} 5002 > /tmp/slow' </dev/null >/dev/null 2>&1 &")
    pool.sh("va", f"setsid sh -c 'ping -c 120 -W 1 {b} > /tmp/ping.log' </dev/null >/dev/null 2>&1 &")

    def received() -> int:
        out = pool.sh("va", "wc -l < /tmp/slow", check=False).stdout.strip()
        return int(out) if out.isdigit() else -1

    until(lambda: received() > 0, 30, "the stream to start")
    before = received()
    pool.cli("vm", "migrate", "vb", "--to", target, timeout=600)
    after = received()
    assert pool.host_of("vb") == target
    assert pool.has_address("vb", b), "vb lost its address in the move"
    assert pool.ok("va", f"ping -c 2 -W 3 {b}")
    # The connection made before the move still carries data after it, with no line lost or repeated.
    until(lambda: received() > after + 20, 90, f"the stream to go on after the move ({before} before, {after} after)")
    assert pool.ok("va", "awk 'NR != $1 {bad = 1} END {exit bad}' /tmp/slow"), "the stream lost or repeated lines"
    until(lambda: "packets transmitted" in pool.sh("va", "cat /tmp/ping.log").stdout, 180, "the ping to end")
    print("\nping across the move: " + pool.sh("va", "tail -n 2 /tmp/ping.log").stdout)
    pool.sh("va", "kill $(pidof nc) $(pidof sleep) 2>/dev/null; true", check=False)
    assert shown_hosts(pool) == sorted({"h1", target})
    # The name still gives the same address, from the DNS of vb's new host (the guest's resolver may retry once
    # while the busy machine settles after the move).
    gateway = pool.net_show("ov")["gateway"]
    until(lambda: pool.resolve("va", "vb", gateway) == b, 30, f"vb to resolve after the move: {pool.log_tail(target)}")
    # The forward followed vb: it answers at the destination's address, and the source holds nothing of it.
    until(lambda: pool.fetch(target, 20081) == "fwd-ok", 30, f"the forward on {target}: {pool.log_tail(target)}")
    assert pool.fetch(source, 20081) is None, f"the forward still answers on {source} after the move"
    assert "20081" not in pool.host_sh(source, "nft", "list", "ruleset")
    listed = json.loads(pool.cli("vm", "port-forward", "vb", "--json").stdout)
    assert [(f["host_port"], f["guest_port"]) for f in listed] == [(20081, 8081)], listed


def shown_hosts(pool: Pool) -> list[str]:
    return pool.net_show("ov")["hosts"]  # type: ignore[no-any-return]
