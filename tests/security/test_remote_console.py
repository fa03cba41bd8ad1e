"""The serial console over HTTPS: a tenant's CLI reaches its own VM's console with its token and the pinned
certificate trust of its other requests; another project's VM, or no token, gets nothing of it."""

from __future__ import annotations

import pytest

from tests.conftest import unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pa_vm(tenants) -> str:  # type: ignore[no-untyped-def]
    name = unique("con")
    made = tenants.cli_as("pa-admin", "vm", "run", name, "--memory", "128M", timeout=300)
    assert made.returncode == 0, made.stderr
    return name


def test_a_tenant_types_into_its_own_vms_console_over_https(tenants, pa_vm: str) -> None:
    typed = tenants.cli_as("pa-operator", "vm", "console", pa_vm, input="echo console-$((6*7))\n", timeout=60)
    assert typed.returncode == 0, typed.stderr
    assert "console-42" in typed.stdout, typed.stdout[-2000:]


def test_another_projects_console_is_not_found_and_no_token_is_refused(tenants, pa_vm: str) -> None:
    other = tenants.cli_as("pb-admin", "vm", "console", pa_vm, input="echo leaked\n", timeout=60)
    assert other.returncode != 0
    assert "leaked" not in other.stdout and "not found" in other.stderr.lower(), other.stderr
    with tenants.https(None) as anonymous:
        answer = anonymous.get(
            f"/vms/{pa_vm}/console",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
    assert answer.status_code == 403, "no upgrade without a valid token"
