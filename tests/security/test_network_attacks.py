"""Attacks on the host's network and on its facts, as a hostile project admin (pa) would try them over HTTPS.

Findings 4, 5 and part of 9 of issue 11: a port forward that took over a port of a host service (its DNAT caught
the host's own connections), a bridge-mode network that joined another tenant's bridge, `/hosts` and `/pool`
telling every token about the machine, and a port clash that named another project's VM. Each attack must be
refused with a useful message, and must change nothing: no nftables rule, no bridge port, no row.

Needs root, dnsmasq and nft (real bridges and rules); skips loudly otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.host.firewall import table_tag
from tests.conftest import require, unique
from tests.security.conftest import Tenants

pytestmark = [pytest.mark.integration]

RANGE = range(20000, 30000)  # the default port_forward_range
ALLOWED = f"sxok{os.getpid() % 10000}"  # a host bridge on the bridge_uplinks allowlist
UNLISTED = f"sxno{os.getpid() % 10000}"  # a host bridge that is not


@pytest.fixture(scope="module")
def daemon_config() -> dict[str, object]:
    require(os.geteuid() == 0, "network attacks need root (bridges, TAPs, nftables)")
    require(shutil.which("dnsmasq") is not None, "dnsmasq is not installed (make setup installs dnsmasq-base)")
    require(shutil.which("nft") is not None, "nft is not installed (make setup installs nftables)")
    # The allowlist names a corral-looking bridge too: corral's own bridges are never uplinks, whatever it says.
    return {"bridge_uplinks": [ALLOWED, "crl00000000"]}


@pytest.fixture(scope="module")
def default_bridge(tenants: Tenants) -> str:
    """The bridge of the installation's default NAT network (the test daemons' environment turns off making it at
    start, so the local root makes it as a fresh installation would)."""
    with tenants.https("cluster-admin") as ops:
        shown = ops.get("/networks/default")
        if shown.status_code == 404:
            tenants.daemon.cli("network", "create", "default")
            shown = ops.get("/networks/default")
        return shown.json()["bridge"]


@pytest.fixture(scope="module")
def host_bridges() -> Iterator[None]:
    for name in (ALLOWED, UNLISTED):
        subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
    try:
        yield
    finally:
        for name in (ALLOWED, UNLISTED):
            subprocess.run(["ip", "link", "del", name], check=False)


def free_port(kind: int = socket.SOCK_STREAM, taken: tuple[int, ...] = ()) -> int:
    """A host port in the forward range that no program holds, on any address."""
    for port in range(RANGE.start + (os.getpid() * 7) % 5000, RANGE.stop):
        if port in taken:
            continue
        try:
            for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                with socket.socket(family, kind) as probe:
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port in the forward range")


SERVICE = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
server = socket.socket(family, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(8)
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    print(peer[0], file=sys.stderr, flush=True)
    conn.sendall(b"host-service\\n")
    conn.close()
"""


@contextlib.contextmanager
def host_service(address: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A service of the host's own on ADDRESS:PORT that answers 'host-service' to whoever connects."""
    proc = subprocess.Popen([sys.executable, "-c", SERVICE, address, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def ask(address: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect((address, port))
        return conn.recv(100).decode().strip()


def nft_tables(tenants: Tenants) -> str:
    """This daemon's own nftables tables (other corral homes on the machine have theirs)."""
    tag = table_tag(tenants.daemon.home)
    out = []
    for family, name in (("inet", f"corral_{tag}"), ("ip", f"corral_{tag}_nat"), ("bridge", f"corral_{tag}")):
        listed = subprocess.run(["nft", "list", "table", family, name], capture_output=True, text=True)
        out.append(re.sub(r"counter packets \d+ bytes \d+", "counter", listed.stdout))
    return "\n".join(out)


def bridge_ports() -> dict[str, list[str]]:
    found = {}
    for brif in Path("/sys/class/net").glob("*/brif"):
        found[brif.parent.name] = sorted(os.listdir(brif))
    return found


def state(tenants: Tenants) -> dict[str, object]:
    """Everything an attack here could change: rules, bridge ports, networks and forwards of both projects."""
    with tenants.https("cluster-admin") as ops:
        networks = {p: ops.get("/networks", params={"project": p}).json() for p in ("default", "pa", "pb")}
        vms = {p: ops.get("/vms", params={"project": p}).json() for p in ("pa", "pb")}
    forwards = {p: sorted((vm["name"], str(vm.get("port_forwards"))) for vm in vms[p]) for p in vms}
    nets = {p: sorted((n["name"], n["bridge"], n["state"]) for n in networks[p]) for p in networks}
    return {"nft": nft_tables(tenants), "bridges": bridge_ports(), "networks": nets, "forwards": forwards}


def settled(tenants: Tenants, timeout: float = 20) -> dict[str, object]:
    """The state once the agent has caught up with earlier changes (it reconciles every 2 s): the baseline an
    attack is compared with."""
    deadline = time.monotonic() + timeout
    last = state(tenants)
    while time.monotonic() < deadline:
        time.sleep(2.5)
        now = state(tenants)
        if now == last:
            return now
        last = now
    raise AssertionError("the daemon's networks did not settle")


def refused(answer: httpx.Response, status: int, *words: str) -> str:
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith("application/problem+json")
    body = answer.json()
    text = f"{body['detail']} ({body.get('hint', '')})"
    for word in words:
        assert word in text, text
    return text


@pytest.fixture(scope="module")
def pa_vm(tenants: Tenants) -> str:
    """pa's running guest on pa's own NAT network, serving a page on port 80."""
    created = tenants.cli_as("pa-admin", "network", "create", "pa-net")
    assert created.returncode == 0, created.stderr
    name = unique("pa-web")
    run = tenants.cli_as("pa-admin", "vm", "run", name, "--image", "tiny", "--nic", "network=pa-net")
    assert run.returncode == 0, run.stderr
    page = "mkdir -p /tmp/www && echo guest-page > /tmp/www/index.html && httpd -p 80 -h /tmp/www"
    served = tenants.cli_as("pa-admin", "vm", "exec", name, "--", "sh", "-c", page)
    assert served.returncode == 0, served.stderr
    return name


@pytest.fixture(scope="module")
def pb_vm(tenants: Tenants) -> tuple[str, str]:
    """pb's VM (never started) on pb's NAT network; returns (VM name, the network's bridge)."""
    created = tenants.cli_as("pb-admin", "network", "create", "pb-net")
    assert created.returncode == 0, created.stderr
    name = unique("pb-secret")
    made = tenants.cli_as("pb-admin", "vm", "create", name, "--image", "tiny", "--nic", "network=pb-net")
    assert made.returncode == 0, made.stderr
    with tenants.https("pb-admin") as pb:
        bridge = pb.get("/networks/pb-net").json()["bridge"]
    return name, bridge


def forward(tenants: Tenants, who: str, vm: str, host_port: int, guest_port: int = 80, protocol: str = "tcp"):  # type: ignore[no-untyped-def]
    with tenants.https(who) as client:
        return client.post(
            f"/vms/{vm}/port-forwards", json={"host_port": host_port, "guest_port": guest_port, "protocol": protocol}
        )


# -- host facts ------------------------------------------------------------------------------------------------


def test_hosts_and_pool_are_hidden_from_project_tokens(tenants: Tenants) -> None:
    with tenants.https("cluster-admin") as ops:
        listed = ops.get("/hosts")
        assert listed.status_code == 200, listed.text
        host = listed.json()[0]["name"]
        assert ops.get(f"/hosts/{host}").status_code == 200
        assert ops.get("/pool").status_code == 200
    for who in ("pa-admin", "pa-viewer", "pb-admin"):
        with tenants.https(who) as client:
            for path in ("/hosts", f"/hosts/{host}", "/hosts/no-such-host", "/pool"):
                text = refused(client.get(path), 403, "cluster-wide role")
                assert "bridges" not in text and "memory" not in text
    # The placement dry run tells a tenant which host would take the VM, not the hosts' sizes or load.
    ask_plan = {"spec": {"name": "probe", "image": "tiny", "memory": "64G"}, "start": True}
    with tenants.https("cluster-admin") as ops:
        full = ops.post("/placement/plan", json=ask_plan)
        assert full.status_code == 200, full.text
        assert all(verdict["allocation"] for verdict in full.json()["hosts"]), full.text
    with tenants.https("pa-viewer") as client:
        plan = client.post("/placement/plan", json=ask_plan)
        assert plan.status_code == 200, plan.text
        for verdict in plan.json()["hosts"]:
            assert verdict["reason"] in ("chosen", "fits", "cannot take this VM now"), verdict
            assert verdict["allocation"] == {} and verdict["weight"] is None, verdict
        assert "memory" not in plan.text and "vCPUs" not in plan.text
    # The CLI says so in one line, with the fix.
    denied = tenants.cli_as("pa-admin", "host", "list")
    assert denied.returncode != 0 and "cluster-wide role" in denied.stderr, denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1, denied.stderr
    assert host not in denied.stdout + denied.stderr


# -- port forwards ---------------------------------------------------------------------------------------------


def test_a_forward_outside_the_range_is_refused(tenants: Tenants, pa_vm: str) -> None:
    """The probe's attack: a forward onto the port of a host service (127.0.0.1:18999) outside the range."""
    port = 18999
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            stack.enter_context(host_service("127.0.0.1", port))
        before = settled(tenants)
        for target in (port, 22, 443, 65535, RANGE.start - 1, RANGE.stop):
            refused(forward(tenants, "pa-admin", pa_vm, target), 422, "outside the range", "20000-29999")
        refused(forward(tenants, "pa-admin", pa_vm, 53, 53, "udp"), 422, "outside the range")
        # The local root is bound by the administrator's range too.
        local = tenants.daemon.cli("--project", "pa", "vm", "port-forward", pa_vm, f"{port}:80", check=False)
        assert local.returncode != 0 and "outside the range" in local.stderr, local.stderr
        assert state(tenants) == before
        assert f"dport {port}" not in nft_tables(tenants)


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::1"])
def test_a_port_a_host_service_holds_is_refused_and_the_service_keeps_answering(
    tenants: Tenants, pa_vm: str, address: str
) -> None:
    port = free_port()
    with host_service(address, port) as service:
        ask("::1" if ":" in address else "127.0.0.1", port)
        before = settled(tenants)
        text = refused(forward(tenants, "pa-admin", pa_vm, port), 409, "in use on the host")
        # Who holds the port is the host's business: no program, pid or user.
        for secret in ("python", str(service.pid), "root", address):
            assert secret not in text.replace("the host", ""), text
        assert state(tenants) == before
        assert f"dport {port}" not in nft_tables(tenants)
        # The CLI says the same in one line.
        cli = tenants.cli_as("pa-admin", "vm", "port-forward", pa_vm, f"{port}:80")
        assert cli.returncode != 0 and "in use on the host" in cli.stderr, cli.stderr
        assert len(cli.stderr.strip().splitlines()) == 1 and "python" not in cli.stderr, cli.stderr
        assert state(tenants) == before
        # The host's own connections still reach its own service, not pa's guest.
        assert ask("::1" if ":" in address else "127.0.0.1", port) == "host-service"


def test_a_udp_port_a_host_program_holds_is_refused(tenants: Tenants, pa_vm: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", port))
        before = settled(tenants)
        refused(forward(tenants, "pa-admin", pa_vm, port, 53, "udp"), 409, "in use on the host")
        assert state(tenants) == before


def test_user_mode_forwards_obey_the_same_range_and_check(tenants: Tenants) -> None:
    """A VM on QEMU's user-mode network (its hostfwd binds the port itself): the same refusals."""
    name = unique("pa-user")
    made = tenants.cli_as("pa-admin", "vm", "create", name, "--image", "tiny")
    assert made.returncode == 0, made.stderr
    port = free_port()
    with host_service("127.0.0.1", port):
        before = settled(tenants)
        refused(forward(tenants, "pa-admin", name, 18999), 422, "outside the range")
        refused(forward(tenants, "pa-admin", name, port), 409, "in use on the host")
        assert state(tenants) == before
        assert ask("127.0.0.1", port) == "host-service"


def test_a_forward_in_the_range_works_from_outside_and_holds_its_port(tenants: Tenants, pa_vm: str) -> None:
    """A free port in the range: the forward reaches the guest from outside the host (a network namespace behind
    a veth pair) and from the host itself, a host service on another port is untouched, and no host program can
    take the forwarded port while the forward exists (so no host service is ever behind it)."""
    other = free_port()
    port = free_port(taken=(other,))
    with host_service("127.0.0.1", other):
        accepted = forward(tenants, "pa-admin", pa_vm, port)
        assert accepted.status_code == 202, accepted.text
        assert tenants.wait("pa-admin", accepted.json()["job"]["id"])["state"] == "succeeded"
        try:
            assert f"dport {port}" in nft_tables(tenants)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as reply:
                assert reply.read().decode().strip() == "guest-page"
            tag = os.getpid() % 10000
            namespace, host_end, far_end = f"sxn{tag}", f"sxv{tag}", f"sxw{tag}"
            subprocess.run(["ip", "netns", "add", namespace], check=True)
            try:
                subprocess.run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", far_end], check=True)
                subprocess.run(["ip", "link", "set", far_end, "netns", namespace], check=True)
                subprocess.run(["ip", "addr", "add", "198.51.100.5/30", "dev", host_end], check=True)
                subprocess.run(["ip", "link", "set", host_end, "up"], check=True)
                inside = ["ip", "netns", "exec", namespace]
                subprocess.run([*inside, "ip", "addr", "add", "198.51.100.6/30", "dev", far_end], check=True)
                subprocess.run([*inside, "ip", "link", "set", far_end, "up"], check=True)
                fetch = f"import urllib.request as u; print(u.urlopen('http://198.51.100.5:{port}/index.html').read())"
                outside = subprocess.run([*inside, sys.executable, "-c", fetch], capture_output=True, text=True,
                                         timeout=30)  # fmt: skip
                assert "guest-page" in outside.stdout, outside.stderr
            finally:
                subprocess.run(["ip", "link", "del", host_end], check=False)
                subprocess.run(["ip", "netns", "del", namespace], check=False)
            # The host service on the other port still answers the host.
            assert ask("127.0.0.1", other) == "host-service"
            # The forwarded port is held: a host program cannot start listening behind the forward.
            for family, address in (
                (socket.AF_INET, "127.0.0.1"),
                (socket.AF_INET, "0.0.0.0"),
                (socket.AF_INET6, "::1"),
            ):
                with socket.socket(family, socket.SOCK_STREAM) as late, pytest.raises(OSError):
                    late.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    late.bind((address, port))
        finally:
            with tenants.https("pa-admin") as pa:
                gone = pa.post(f"/vms/{pa_vm}/port-forwards/remove", json={"host_port": port})
                assert gone.status_code == 202, gone.text
            assert tenants.wait("pa-admin", gone.json()["job"]["id"])["state"] == "succeeded"
    assert f"dport {port}" not in nft_tables(tenants)
    with socket.socket() as free_again:
        free_again.bind(("127.0.0.1", port))  # released with the forward


def test_a_clash_with_another_projects_forward_does_not_name_its_vm(
    tenants: Tenants, pa_vm: str, pb_vm: tuple[str, str]
) -> None:
    victim, _bridge = pb_vm
    port = free_port()
    accepted = forward(tenants, "pb-admin", victim, port)
    assert accepted.status_code == 202, accepted.text
    assert tenants.wait("pb-admin", accepted.json()["job"]["id"])["state"] == "succeeded"
    before = settled(tenants)
    text = refused(forward(tenants, "pa-admin", pa_vm, port), 409, "already forwarded")
    assert victim not in text and "pb" not in text.replace(f"{port}", ""), text
    assert state(tenants) == before
    # In one's own project the clash names the VM, which helps and tells nothing new.
    with tenants.https("pb-admin") as pb:
        own = pb.post(f"/vms/{victim}/port-forwards", json={"host_port": port, "guest_port": 22})
        refused(own, 409, "already forwarded", victim)


UDP_SERVICE = """
import socket, sys
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
while True:
    data, peer = server.recvfrom(100)
    print(peer[0], file=sys.stderr, flush=True)
"""


def test_a_guest_cannot_reach_the_hosts_loopback_services(tenants: Tenants, pa_vm: str) -> None:
    """route_localnet (which lets forwards work through 127.0.0.1) must not let a guest send to 127.0.0.1 on its
    gateway and reach a host service bound to loopback only (kube-proxy's CVE-2020-8558), over TCP or UDP. The
    guest's packets must reach the host's bridge and be dropped there by corral's rule."""
    port = free_port()
    with tenants.https("pa-admin") as pa:
        gateway = pa.get("/networks/pa-net").json()["gateway"]
    # In the guest: route 127.0.0.1 out of eth0 to the gateway instead of the guest's own loopback.
    script = (
        "for f in all eth0; do echo 1 > /proc/sys/net/ipv4/conf/$f/route_localnet; done;"
        " ip route del local 127.0.0.1 dev lo table local; ip route del local 127.0.0.0/8 dev lo table local;"
        f" ip route add 127.0.0.1/32 via {gateway} dev eth0; echo | nc -w 3 127.0.0.1 {port}; r=$?;"
        f" echo datagram | nc -u -w 1 127.0.0.1 {port};"
        " ip route del 127.0.0.1/32; ip route add local 127.0.0.0/8 dev lo table local;"
        " ip route add local 127.0.0.1 dev lo table local; exit $r"
    )
    udp = subprocess.Popen([sys.executable, "-c", UDP_SERVICE, str(port)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert udp.stdout is not None and udp.stdout.readline().strip() == "listening"
        with host_service("127.0.0.1", port) as service:
            tried = tenants.cli_as("pa-admin", "vm", "exec", pa_vm, "--", "sh", "-c", script, timeout=120)
            assert "host-service" not in tried.stdout, "a guest reached a host service bound to 127.0.0.1"
            assert ask("127.0.0.1", port) == "host-service"
            service.kill()
            assert service.stderr is not None
            peers = service.stderr.read().split()
    finally:
        udp.kill()
        udp.wait(10)
    assert udp.stderr is not None
    udp_peers = udp.stderr.read().split()
    assert peers == ["127.0.0.1"], f"the host's TCP service was reached from {peers}"
    assert udp_peers == [], f"the host's UDP service got datagrams from {udp_peers}"
    # The guest's packets did reach the host's bridge, and the rule for them dropped them.
    chain = subprocess.run(["nft", "list", "chain", "inet", f"corral_{table_tag(tenants.daemon.home)}", "prerouting"],
                           capture_output=True, text=True).stdout  # fmt: skip
    dropped = re.search(r"ip daddr 127\.0\.0\.0/8 counter packets (\d+) bytes \d+ drop", chain)
    assert dropped is not None and int(dropped[1]) > 0, (chain, tried.stderr)


def test_an_isolated_guest_cannot_reach_a_port_forward_through_its_gateway(
    tenants: Tenants, pa_vm: str, host_bridges: None
) -> None:
    """pb's isolated guest asks its own gateway for pa's forwarded port: the forward's DNAT must not route it out
    of the isolated network into pa's (an isolated network has no way out)."""
    port = free_port()
    accepted = forward(tenants, "pa-admin", pa_vm, port)
    assert accepted.status_code == 202, accepted.text
    assert tenants.wait("pa-admin", accepted.json()["job"]["id"])["state"] == "succeeded"
    inmate = unique("pb-iso")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as reply:
            assert reply.read().decode().strip() == "guest-page"  # the forward works from the host
        made = tenants.cli_as("pb-admin", "network", "create", "pb-iso", "--mode", "isolated")
        assert made.returncode == 0, made.stderr
        ran = tenants.cli_as("pb-admin", "vm", "run", inmate, "--image", "tiny", "--nic", "network=pb-iso")
        assert ran.returncode == 0, ran.stderr
        with tenants.https("pb-admin") as pb:
            gateway = pb.get("/networks/pb-iso").json()["gateway"]
            address = pb.get(f"/vms/{inmate}").json()["nics"][0]["ip"]
        fetch = (
            f"ip addr add {address}/24 dev eth0 2>/dev/null;"
            f" printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {gateway} {port}"
        )
        tried = tenants.cli_as("pb-admin", "vm", "exec", inmate, "--", "sh", "-c", fetch, timeout=120)
        assert "guest-page" not in tried.stdout, "an isolated guest reached another network through a forward"
    finally:
        with tenants.https("pa-admin") as pa:
            gone = pa.post(f"/vms/{pa_vm}/port-forwards/remove", json={"host_port": port})
        tenants.wait("pa-admin", gone.json()["job"]["id"])
        tenants.cli_as("pb-admin", "vm", "delete", inmate, "--force")


def test_subnet_clashes_name_neither_another_projects_network_nor_the_hosts_interfaces(
    tenants: Tenants, pb_vm: tuple[str, str], host_bridges: None
) -> None:
    with tenants.https("pb-admin") as pb:
        pb_subnet = pb.get("/networks/pb-net").json()["subnet"]
    subprocess.run(["ip", "addr", "add", "192.168.252.1/24", "dev", UNLISTED], check=True)
    try:
        before = settled(tenants)
        with tenants.https("pa-admin") as pa:
            text = refused(pa.post("/networks", json={"name": "squat", "subnet": pb_subnet}), 409, "another network")
            assert "pb-net" not in text and pb_subnet not in text.split("overlaps")[1], text
            # A subnet the host uses on one of its interfaces: the job fails without naming the interface.
            accepted = pa.post("/networks", json={"name": "probe", "subnet": "192.168.252.0/24"})
            assert accepted.status_code == 202, accepted.text
        job = tenants.wait("pa-admin", accepted.json()["job"]["id"])
        assert job["state"] == "failed" and "address range the host uses" in job["error"], job
        assert UNLISTED not in str(job) and "192.168.252.1" not in str(job), job
        assert state(tenants) == before
    finally:
        subprocess.run(["ip", "addr", "del", "192.168.252.1/24", "dev", UNLISTED], check=False)


# -- bridge mode -----------------------------------------------------------------------------------------------


def test_bridge_mode_onto_another_tenants_or_corrals_bridge_is_refused(
    tenants: Tenants, pb_vm: tuple[str, str], default_bridge: str, host_bridges: None
) -> None:
    _victim, pb_bridge = pb_vm
    before = settled(tenants)
    for uplink in (pb_bridge, default_bridge, UNLISTED, "crl00000001", "eth0"):
        with tenants.https("pa-admin") as pa:
            answer = pa.post("/networks", json={"name": "joined", "mode": "bridge", "uplink": uplink})
        text = refused(answer, 403, "need a cluster admin", ALLOWED)
        assert "pb" not in text.replace(pb_bridge, "") and "project" not in text, text
    # corral's own bridges are never uplinks, whoever asks and whatever the allowlist says.
    for uplink in (pb_bridge, default_bridge, "crl00000000"):
        for who in ("cluster-admin", "pa-admin"):
            if who == "pa-admin" and uplink != "crl00000000":
                continue  # refused above, before the store is looked at
            with tenants.https(who) as client:
                answer = client.post("/networks", json={"name": "joined", "mode": "bridge", "uplink": uplink})
            refused(answer, 422, "bridge corral made")
    local = tenants.daemon.cli("network", "create", "joined", "--mode", "bridge", "--uplink", pb_bridge, check=False)
    assert local.returncode != 0 and "bridge corral made" in local.stderr, local.stderr
    # A viewer or operator may not even ask.
    for who in ("pa-viewer", "pa-operator"):
        with tenants.https(who) as client:
            refused(client.post("/networks", json={"name": "joined", "mode": "bridge", "uplink": ALLOWED}), 403)
    assert state(tenants) == before


def test_bridge_mode_on_an_allowed_host_bridge(tenants: Tenants, host_bridges: None) -> None:
    """The administrator's allowlist: a tenant may join the listed bridge; a cluster admin too, and any other host
    bridge that is not corral's."""
    for who, name, uplink in (("cluster-admin", "ops-lan", ALLOWED), ("cluster-admin", "ops-lan2", UNLISTED),
                              ("pa-admin", "pa-lan", ALLOWED)):  # fmt: skip
        with tenants.https(who) as client:
            answer = client.post("/networks", json={"name": name, "mode": "bridge", "uplink": uplink})
            assert answer.status_code == 202, answer.text
            assert tenants.wait(who, answer.json()["job"]["id"])["state"] == "succeeded"
            assert client.get(f"/networks/{name}").json()["bridge"] == uplink
            deleted = client.delete(f"/networks/{name}")
            assert deleted.status_code == 202, deleted.text
            assert tenants.wait(who, deleted.json()["job"]["id"])["state"] == "succeeded"
        assert Path("/sys/class/net", uplink).exists(), "deleting a bridge-mode network removed the host's bridge"
