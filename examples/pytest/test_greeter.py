"""Tests of a small HTTP service, each run inside a fresh VM that corral forks for it.

Run with a corral daemon up (`corral serve --detach`) and the tiny image built (`corral image build tiny`):

    pytest -v
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from corral.testing import VM

SERVICE = (Path(__file__).parent / "service" / "greet.cgi").read_text()


def install(vm: VM) -> None:
    """Copy the service into the guest and start it (busybox httpd on port 8080)."""
    vm.exec(["sh", "-c", "mkdir -p /srv/www/cgi-bin && cat > /srv/www/cgi-bin/greet"], stdin=SERVICE, check=True)
    vm.exec(["sh", "-c", "chmod +x /srv/www/cgi-bin/greet && httpd -p 8080 -h /srv/www"], check=True)


def get(vm: VM, url: str) -> str:
    """GET a URL from inside a guest (wget's exit code says whether the status was 2xx)."""
    for _ in range(50):  # a just-started server may need a moment to listen
        result = vm.exec(["wget", "-q", "-O", "-", url])
        if result.exit_code == 0 or "bad name" in result.stderr or "400" in result.stderr:
            return result.stdout if result.exit_code == 0 else "HTTP 400"
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer: {result.stderr}")


@pytest.fixture
def greeter(corral_vm: VM) -> VM:
    install(corral_vm)
    return corral_vm


def test_greets_by_name(greeter: VM) -> None:
    assert get(greeter, "http://127.0.0.1:8080/cgi-bin/greet?name=ada") == "hello ada (#1)\n"


def test_counts_requests(greeter: VM) -> None:
    get(greeter, "http://127.0.0.1:8080/cgi-bin/greet?name=ada")
    assert get(greeter, "http://127.0.0.1:8080/cgi-bin/greet?name=bob") == "hello bob (#2)\n"


def test_refuses_a_bad_name(greeter: VM) -> None:
    assert get(greeter, "http://127.0.0.1:8080/cgi-bin/greet?name=../etc") == "HTTP 400"


def test_every_test_starts_clean(corral_vm: VM) -> None:
    # The tests above wrote /var/greeter/count in their own VMs; none of it is here.
    assert corral_vm.exec(["test", "-e", "/var/greeter/count"]).exit_code == 1


@pytest.mark.corral(memory="256M")
def test_a_bigger_vm(corral_vm: VM) -> None:
    total_kib = int(corral_vm.exec(["sh", "-c", "awk '/MemTotal/ {print $2}' /proc/meminfo"]).stdout)
    assert total_kib > 160 * 1024


def test_over_the_network(corral_env) -> None:  # type: ignore[no-untyped-def]
    web, client = corral_env["web"], corral_env["client"]
    install(web)
    assert get(client, f"http://{web.ip}:8080/cgi-bin/greet?name=net") == "hello net (#1)\n"
