"""Virtual networks on the real kernel: Linux bridges, dnsmasq, nftables, TAPs and real guests.

One daemon (with its default NAT network) and a few guests are shared by the module; every bridge, TAP,
dnsmasq and nftables table the run made is removed at teardown (Daemon.cleanup), even after a failure.
Needs root, dnsmasq and nft; skips loudly otherwise (and fails in CI, which installs them).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, new_home, require, unique

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def net_daemon(qemu_available):  # type: ignore[no-untyped-def]
    require(os.geteuid() == 0, "network tests need root (bridges, TAPs, nftables)")
    require(shutil.which("dnsmasq") is not None, "dnsmasq is not installed (make setup installs dnsmasq-base)")
    require(shutil.which("nft") is not None, "nft is not installed (make setup installs nftables)")
    home = new_home()
    corral = Daemon(home, {"CORRAL_DEFAULT_NETWORK": "1"})
    try:
        corral.start()
        corral.cli("image", "build", "tiny", timeout=1800)
        yield corral
    finally:
        corral.cleanup()
        shutil.rmtree(home, ignore_errors=True)


def network(corral: Daemon, name: str) -> dict[str, Any]:
    return corral.cli_json("network", "show", name)  # type: ignore[return-value]


def guest(corral: Daemon, vm: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return corral.cli("vm", "exec", vm, "--", "sh", "-c", script, check=check, timeout=120)


def guest_ok(corral: Daemon, vm: str, script: str) -> bool:
    return guest(corral, vm, script, check=False).returncode == 0


def reserved_ip(corral: Daemon, vm: str, slot: int = 0) -> str:
    shown = corral.cli_json("vm", "show", vm)
    return next(nic["ip"] for nic in shown["nics"] if nic["slot"] == slot)  # type: ignore[index]


def wait_for_address(corral: Daemon, vm: str, address: str, iface: str = "eth0", timeout: float = 30) -> None:
    """The guest's DHCP client took the reserved address (the tiny image runs udhcpc on every NIC)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if guest_ok(corral, vm, f"ip -4 addr show dev {iface} | grep -q 'inet {address}/'"):
            return
        time.sleep(0.5)
    shown = guest(corral, vm, "ip -4 addr", check=False).stdout
    raise AssertionError(f"{vm} did not get {address} on {iface}: {shown}")


def run_vm(corral: Daemon, name: str, *nics: str) -> None:
    args = ["vm", "run", name, "--image", "tiny"]
    for nic in nics:
        args += ["--nic", nic]
    corral.cli(*args, timeout=300)


@pytest.fixture(scope="module")
def pair(net_daemon: Daemon) -> tuple[str, str]:
    """Two guests on the default NAT network."""
    a, b = unique("na"), unique("nb")
    run_vm(net_daemon, a, "network=default")
    run_vm(net_daemon, b, "network=default")
    wait_for_address(net_daemon, a, reserved_ip(net_daemon, a))
    wait_for_address(net_daemon, b, reserved_ip(net_daemon, b))
    return a, b


def free_port() -> int:
    """A free host port in the default range for port forwards (port_forward_range, 20000-29999)."""
    for port in range(20000 + (os.getpid() * 7) % 9000, 30000):
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in the range for port forwards")


def test_default_nat_network_is_made_on_first_start(net_daemon: Daemon) -> None:
    default = network(net_daemon, "default")
    assert default["mode"] == "nat" and default["state"] == "ready", default
    bridge = Path("/sys/class/net", default["bridge"])
    assert (bridge / "bridge").is_dir(), "the default network's Linux bridge is missing"
    addresses = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", default["bridge"]], capture_output=True, text=True, check=True
    ).stdout
    assert f"{default['gateway']}/" in addresses
    pid_file = net_daemon.home / "run" / "networks" / default["id"][:12] / "dnsmasq.pid"
    pid = int(pid_file.read_text())
    assert b"dnsmasq" in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_two_guests_get_their_addresses_by_dhcp_and_reach_each_other(net_daemon: Daemon, pair: tuple[str, str]) -> None:
    a, b = pair
    ip_a, ip_b = reserved_ip(net_daemon, a), reserved_ip(net_daemon, b)
    subnet = ipaddress.IPv4Network(network(net_daemon, "default")["subnet"])
    assert ip_a != ip_b and ipaddress.IPv4Address(ip_a) in subnet and ipaddress.IPv4Address(ip_b) in subnet
    assert guest_ok(net_daemon, a, f"ping -c 2 -W 3 {ip_b}"), f"{a} cannot ping {b}"
    assert guest_ok(net_daemon, b, f"ping -c 2 -W 3 {ip_a}"), f"{b} cannot ping {a}"
    # The gateway (the host) answers, and the guest's default route points at it: the way out through NAT.
    gateway = network(net_daemon, "default")["gateway"]
    assert guest_ok(net_daemon, a, f"ping -c 1 -W 3 {gateway}")
    assert f"default via {gateway}" in guest(net_daemon, a, "ip route").stdout
    # The address shows in `vm show` (reported by the guest agent) too.
    shown = net_daemon.cli_json("vm", "show", a)
    reported = [addr for iface in shown["interfaces"] for addr in iface.get("addresses", [])]  # type: ignore[index]
    deadline = time.monotonic() + 30
    while not any(addr.startswith(ip_a) for addr in reported) and time.monotonic() < deadline:
        time.sleep(1)
        shown = net_daemon.cli_json("vm", "show", a)
        reported = [addr for iface in shown["interfaces"] for addr in iface.get("addresses", [])]  # type: ignore[index]
    assert any(addr.startswith(ip_a) for addr in reported), reported


LISTEN_ONCE = """
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(1)
server.settimeout(60)
print("listening", flush=True)
conn, peer = server.accept()
print(peer[0], flush=True)
"""


def test_nat_masquerades_guest_traffic_leaving_the_host(net_daemon: Daemon, pair: tuple[str, str]) -> None:
    """A guest reaches a machine beyond the host (a network namespace behind a veth pair stands in for the
    uplink's LAN), and that machine sees the host's address, not the guest's."""
    a, _ = pair
    tag = os.getpid() % 100000
    namespace, host_end, far_end = f"crn{tag}", f"crv{tag}", f"crw{tag}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", far_end], check=True)
        subprocess.run(["ip", "link", "set", far_end, "netns", namespace], check=True)
        subprocess.run(["ip", "addr", "add", "198.51.100.1/30", "dev", host_end], check=True)
        subprocess.run(["ip", "link", "set", host_end, "up"], check=True)
        inside = ["ip", "netns", "exec", namespace]
        subprocess.run([*inside, "ip", "addr", "add", "198.51.100.2/30", "dev", far_end], check=True)
        subprocess.run([*inside, "ip", "link", "set", far_end, "up"], check=True)
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        listener = subprocess.Popen(
            [*inside, sys.executable, "-c", LISTEN_ONCE, "198.51.100.2", "7777"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
            guest(net_daemon, a, "echo hi | nc -w 5 198.51.100.2 7777", check=False)
            peer = listener.stdout.readline().strip()
        finally:
            listener.kill()
            listener.wait(10)
        assert peer == "198.51.100.1", f"the far side saw {peer!r}, not the host's address"
    finally:
        subprocess.run(["ip", "link", "del", host_end], check=False)
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def test_port_forward_reaches_a_guest_service(net_daemon: Daemon, pair: tuple[str, str]) -> None:
    a, _ = pair
    guest(net_daemon, a, "mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html && httpd -p 80 -h /tmp/www")
    port = free_port()
    net_daemon.cli("vm", "port-forward", a, f"{port}:80")
    gateway = network(net_daemon, "default")["gateway"]
    for host in ("127.0.0.1", gateway):
        with urllib.request.urlopen(f"http://{host}:{port}/index.html", timeout=10) as reply:
            assert reply.read().decode().strip() == "hello-from-guest", host
    listed = net_daemon.cli_json("vm", "port-forward", a)
    assert [(f["host_port"], f["guest_port"], f["protocol"]) for f in listed] == [(port, 80, "tcp")]  # type: ignore[index]
    # A second forward of the same host port is refused, whoever asks.
    clash = net_daemon.cli("vm", "port-forward", a, f"{port}:22", check=False)
    assert clash.returncode != 0 and "already forwarded" in clash.stderr
    net_daemon.cli("vm", "port-forward", a, "--remove", str(port))
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=3)


def test_a_guest_cannot_spoof_another_address_or_mac(net_daemon: Daemon, pair: tuple[str, str]) -> None:
    a, b = pair
    ip_b = reserved_ip(net_daemon, b)
    subnet = ipaddress.IPv4Network(network(net_daemon, "default")["subnet"])
    stolen = str(subnet.network_address + 200)
    assert guest_ok(net_daemon, a, f"ping -c 1 -W 3 {ip_b}")
    guest(net_daemon, a, f"ip addr add {stolen}/{subnet.prefixlen} dev eth0")
    try:
        assert not guest_ok(net_daemon, a, f"ping -c 2 -W 2 -I {stolen} {ip_b}"), "a spoofed source address got through"
        assert guest_ok(net_daemon, a, f"ping -c 1 -W 3 {ip_b}"), "the guest's own address must keep working"
    finally:
        guest(net_daemon, a, f"ip addr del {stolen}/{subnet.prefixlen} dev eth0", check=False)
    mac = net_daemon.cli_json("vm", "show", a)["nics"][0]["mac"]  # type: ignore[index]
    guest(net_daemon, a, "ip link set eth0 address 52:54:00:de:ad:01")
    try:
        assert not guest_ok(net_daemon, a, f"ping -c 2 -W 2 {ip_b}"), "a forged MAC got through"
    finally:
        guest(net_daemon, a, f"ip link set eth0 address {mac}")
    assert guest_ok(net_daemon, a, f"ping -c 1 -W 3 {ip_b}")


def test_isolated_networks_cannot_reach_each_other_the_host_or_the_outside(
    net_daemon: Daemon, pair: tuple[str, str]
) -> None:
    iso1, iso2 = unique("iso"), unique("iso")
    net_daemon.cli("network", "create", iso1, "--mode", "isolated")
    net_daemon.cli("network", "create", iso2, "--mode", "isolated")
    c, d = unique("nc"), unique("nd")
    run_vm(net_daemon, c, f"network={iso1}")
    run_vm(net_daemon, d, f"network={iso2}")
    ip_c, ip_d = reserved_ip(net_daemon, c), reserved_ip(net_daemon, d)
    wait_for_address(net_daemon, c, ip_c)
    wait_for_address(net_daemon, d, ip_d)
    gateway_c = network(net_daemon, iso1)["gateway"]
    # No route out is handed to isolated guests; give one by hand to prove the firewall, not the routing table,
    # is what stops them.
    assert "default" not in guest(net_daemon, c, "ip route").stdout
    guest(net_daemon, c, f"ip route add default via {gateway_c}")
    assert not guest_ok(net_daemon, c, f"ping -c 2 -W 2 {ip_d}"), "isolated networks reached each other"
    nat_guest = reserved_ip(net_daemon, pair[0])
    assert not guest_ok(net_daemon, c, f"ping -c 2 -W 2 {nat_guest}"), "an isolated guest reached the NAT network"
    assert not guest_ok(net_daemon, c, f"ping -c 2 -W 2 {gateway_c}"), "an isolated guest reached the host"
    # ... and the other way round: a NAT guest cannot reach into an isolated network.
    assert not guest_ok(net_daemon, pair[0], f"ping -c 2 -W 2 {ip_c}")
    # Deleting a network in use is refused and changes nothing.
    refused = net_daemon.cli("network", "delete", iso1, check=False)
    assert refused.returncode != 0 and c in refused.stderr
    assert network(net_daemon, iso1)["state"] == "ready"
    # Once its VMs are gone the network goes, with its bridge and its DHCP server.
    bridge, net_id = network(net_daemon, iso2)["bridge"], network(net_daemon, iso2)["id"]
    net_daemon.cli("vm", "delete", d, "--force")
    net_daemon.cli("network", "delete", iso2)
    assert not Path("/sys/class/net", bridge).exists()
    assert not (net_daemon.home / "run" / "networks" / net_id[:12]).exists()
    assert bridge not in subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout


def test_nic_hot_add_and_remove_on_a_running_guest(net_daemon: Daemon, pair: tuple[str, str]) -> None:
    _, b = pair
    before = guest(net_daemon, b, "ls /sys/class/net").stdout.split()
    net_daemon.cli("vm", "nic", "add", b, "--network", "default")
    shown = net_daemon.cli_json("vm", "show", b)
    added = shown["nics"][-1]  # type: ignore[index]
    assert added["network"] == "default" and added["ip"], added
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = guest(net_daemon, b, "ls /sys/class/net").stdout.split()
        if len(now) > len(before):
            break
        time.sleep(0.5)
    new = sorted(set(now) - set(before))
    assert len(new) == 1, f"the guest did not see the new NIC: {before} -> {now}"
    assert guest(net_daemon, b, f"cat /sys/class/net/{new[0]}/address").stdout.strip() == added["mac"]
    net_daemon.cli("vm", "nic", "remove", b, str(added["slot"]))
    after = guest(net_daemon, b, "ls /sys/class/net").stdout.split()
    assert sorted(after) == sorted(before)
    assert len(net_daemon.cli_json("vm", "show", b)["nics"]) == 1  # type: ignore[index]


def test_bridge_mode_joins_an_existing_host_bridge(net_daemon: Daemon) -> None:
    host_bridge = f"crb{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", host_bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "192.168.251.1/24", "dev", host_bridge], check=True)
        subprocess.run(["ip", "link", "set", host_bridge, "up"], check=True)
        lan = unique("lan")
        net_daemon.cli("network", "create", lan, "--mode", "bridge", "--uplink", host_bridge)
        e = unique("ne")
        run_vm(net_daemon, e, f"network={lan}")
        ports = os.listdir(f"/sys/class/net/{host_bridge}/brif")
        assert len(ports) == 1 and ports[0].startswith("crt"), ports
        # No corral DHCP on a LAN bridge: configure the guest by hand and reach the host across the bridge.
        guest(net_daemon, e, "ip addr add 192.168.251.9/24 dev eth0 && ip link set eth0 up")
        assert guest_ok(net_daemon, e, "ping -c 2 -W 3 192.168.251.1")
        net_daemon.cli("vm", "delete", e, "--force")
        net_daemon.cli("network", "delete", lan)
        assert Path("/sys/class/net", host_bridge).exists(), "deleting a bridge-mode network removed the host's bridge"
    finally:
        subprocess.run(["ip", "link", "del", host_bridge], check=False)


def test_dnsmasq_that_dies_is_restarted(net_daemon: Daemon) -> None:
    default = network(net_daemon, "default")
    pid_file = net_daemon.home / "run" / "networks" / default["id"][:12] / "dnsmasq.pid"
    old = int(pid_file.read_text())
    os.kill(old, 9)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            new = int(pid_file.read_text())
            if new != old and Path(f"/proc/{new}").exists():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError("dnsmasq was not restarted")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["network", "create", "bad1", "--subnet", "10.87.0.0/33"], "invalid subnet"),
        (["network", "create", "bad2", "--subnet", "8.8.8.0/24"], "not a private range"),
        (["network", "create", "bad3", "--mode", "bridge", "--uplink", "nosuchbr0"], "not a bridge"),
        (["network", "create", "bad4", "--mode", "mesh"], "mode"),
        (["network", "create", "Bad_Name"], "invalid network name"),
        (["vm", "create", "nicbad1", "--nic", "network=nosuchnet"], "network 'nosuchnet' not found"),
        (["vm", "create", "nicbad2", "--nic", "network=default,mac=zz:54:00:00:00:01"], "invalid MAC"),
        (["vm", "create", "nicbad3", "--nic", "network=default,mac=01:00:5e:00:00:01"], "multicast"),
        (["vm", "create", "nicbad4", "--nic", "netwrk=default"], "invalid --nic"),
    ],
)
def test_bad_network_input_is_one_clear_error_and_changes_nothing(
    net_daemon: Daemon, args: list[str], message: str
) -> None:
    networks_before = json.dumps(net_daemon.cli_json("network", "list"), sort_keys=True)
    vms_before = {vm["name"] for vm in net_daemon.cli_json("vm", "list")}  # type: ignore[union-attr, index]
    result = net_daemon.cli(*args, check=False)
    assert result.returncode != 0
    # Progress lines may come first (a job ran and failed); the error itself is one line.
    error_lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert json.dumps(net_daemon.cli_json("network", "list"), sort_keys=True) == networks_before
    assert {vm["name"] for vm in net_daemon.cli_json("vm", "list")} == vms_before  # type: ignore[union-attr, index]


def test_overlapping_subnets_are_refused(net_daemon: Daemon) -> None:
    default = network(net_daemon, "default")
    inside = str(next(ipaddress.IPv4Network(default["subnet"]).subnets(new_prefix=25)))
    result = net_daemon.cli("network", "create", unique("ovl"), "--subnet", inside, check=False)
    assert result.returncode != 0 and "overlaps network 'default'" in result.stderr


def test_networks_are_remade_after_a_reboot_like_loss_and_a_daemon_restart(
    net_daemon: Daemon, pair: tuple[str, str]
) -> None:
    """What a host reboot takes away (the bridge, its address, dnsmasq, the firewall tables) comes back from the
    store, running guests are re-attached, and a daemon killed and restarted finds it all again."""
    a, b = pair
    default = network(net_daemon, "default")
    bridge = default["bridge"]
    pid_file = net_daemon.home / "run" / "networks" / default["id"][:12] / "dnsmasq.pid"
    os.kill(int(pid_file.read_text()), 9)
    subprocess.run(["ip", "link", "del", bridge], check=True)
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.split("\n")
    ours = [line.split() for line in tables if f"corral_{firewall_tag(net_daemon)}" in line]
    for _, family, name in ours:
        subprocess.run(["nft", "delete", "table", family, name], check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not guest_ok(net_daemon, a, f"ping -c 1 -W 2 {reserved_ip(net_daemon, b)}"):
        time.sleep(1)
    assert guest_ok(net_daemon, a, f"ping -c 1 -W 2 {reserved_ip(net_daemon, b)}"), "guests stayed cut off"
    assert Path("/sys/class/net", bridge, "bridge").is_dir()
    tag = firewall_tag(net_daemon)
    deadline = time.monotonic() + 30  # the agent looks for lost tables every 10 s
    while time.monotonic() < deadline:
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        if f"corral_{tag}_nat" in tables:
            break
        time.sleep(1)
    assert sorted(line for line in tables.splitlines() if f"corral_{tag}" in line) == sorted(
        [f"table inet corral_{tag}", f"table ip corral_{tag}_nat", f"table bridge corral_{tag}"]
    ), tables
    net_daemon.kill()
    net_daemon.start()
    assert network(net_daemon, "default")["state"] == "ready"
    assert guest_ok(net_daemon, b, f"ping -c 1 -W 3 {reserved_ip(net_daemon, a)}")


def firewall_tag(corral: Daemon) -> str:
    from corral.host.firewall import table_tag

    return table_tag(corral.home)


def test_metrics_count_each_tap_nics_bytes(net_daemon: Daemon, pair: tuple[str, str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    a, b = pair
    assert guest_ok(net_daemon, a, f"ping -c 3 -W 2 {reserved_ip(net_daemon, b)}")
    deadline = time.monotonic() + 45  # the agent samples every 10 s
    while True:
        with net_daemon.client() as corral:
            text = corral.metrics()
        samples = {
            (sample.name, sample.labels.get("vm")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith("corral_vm_network_")
        }
        sent = samples.get(("corral_vm_network_transmit_bytes_total", a), 0)
        received = samples.get(("corral_vm_network_receive_bytes_total", a), 0)
        if sent > 0 and received > 0:
            return
        assert time.monotonic() < deadline, f"no network bytes reported for {a}: {samples}"
        time.sleep(2)
