"""The web console of a pool, in a real browser: a VM's serial console stays usable across a live migration.

A pool of two hosts on one real PostgreSQL (corral.localpool: each agent in its own network namespace, h2 mounting
h1's storage so the move sends RAM only), its control plane serving HTTPS; Debian's chromium driven by Playwright
logs in with `corral ui`'s link as root, opens the VM's console, types, migrates the VM from the page's form, and
types again into the same console once it says it reconnected on the new host (a `corral vm logs --follow` started
before the move follows it too). Then h2's home is hidden from the control plane: the console names the host and
the fix instead of calling the VM stopped. The first test takes docs/ui.md's "console after a move" screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.localpool import LocalPool
from corral.store.db import Store
from tests.conftest import new_home, require
from tests.e2e.test_ui import CHROMIUM, _goto, _screen, _shot
from tests.secure_daemon import free_port

VM = "pv1"


class UiPool(LocalPool):
    """The pool, with the address its control plane serves HTTPS (and the web console) on."""

    def __init__(self, url: str) -> None:
        super().__init__(
            url, prefix="cu", make_home=lambda host: new_home(f"cu-{host}-"), settings={"CORRAL_ACCEL": "tcg"}
        )
        self.port = free_port()
        self.https_url = f"https://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def pool(postgres, qemu_available) -> Iterator[UiPool]:  # type: ignore[no-untyped-def]
    """h1 and h2 (sharing h1's storage pool and one images directory) and a control plane on HTTPS."""
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    require(os.geteuid() == 0, "network namespaces need root")
    name = f"uip_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    url = f"postgresql+psycopg://corral@/{name}?host={postgres.root}&port={postgres.port}"
    images = new_home("cu-img-")
    pool = UiPool(url)
    try:
        store = Store(url)
        try:
            store.migrate()  # once, before three processes would take turns at it
        finally:
            store.close()
        pool.network()
        pool.start_control(listen=f"127.0.0.1:{pool.port}")
        pool.add_host("h1", images=images)
        pool.add_host("h2", pools_of="h1", images=images)
        pool.wait_online(["h1", "h2"])
        pool.cli("image", "build", "tiny", timeout=1800)
        yield pool
    finally:
        pool.close()
        shutil.rmtree(images, ignore_errors=True)


@pytest.fixture(scope="module")
def page(pool: UiPool) -> Iterator[Any]:
    """Chromium logged in to the pool's console as root, through the one-time link `corral ui` prints."""
    require(shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (make setup)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is missing (make setup installs the dev extras)")
        raise
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # The control plane's certificate is self-signed: accepted as a person clicking through would.
            context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
            context.set_default_timeout(30_000)
            page = context.new_page()
            for attempt in range(3):
                # A code is good once: a load that Chromium aborted after the page traded it needs a new link.
                link = json.loads(pool.cli("ui", "--json").stdout)["url"]
                assert link.startswith(f"{pool.https_url}/ui/#code="), link
                _goto(page, link)
                try:
                    page.wait_for_selector("#nav a", timeout=15_000)
                    break
                except Exception:
                    if attempt == 2:
                        raise
            yield page
        finally:
            browser.close()


def _type_until(page: Any, command: str, answer: str, timeout: float = 90) -> None:
    """Type ``command`` into the console until a line reading ``answer`` is on the screen (the shell may still be
    starting, or the console reconnecting: asked again, as a person would)."""
    deadline = time.monotonic() + timeout
    while True:
        page.click("#console")
        page.keyboard.type(f"{command}\n")
        try:
            page.wait_for_function(
                """(answer) => {
                    const buffer = window.corralTerminal.buffer.active;
                    for (let i = 0; i < buffer.length; i++)
                        if (buffer.getLine(i).translateToString(true).trim() === answer) return true;
                    return false;
                }""",
                arg=answer,
                timeout=5_000,
            )
            return
        except Exception:
            assert time.monotonic() < deadline, f"no {answer!r} on the console: {_screen(page)[-15:]}"


def _vm(pool: UiPool) -> dict[str, Any]:
    return json.loads(pool.cli("vm", "show", VM, "--json").stdout)


def test_the_console_follows_the_vm_across_a_live_migration(pool: UiPool, page: Any) -> None:
    pool.cli("vm", "run", VM, "--host", "h1", "--memory", "160M", timeout=400)
    assert _vm(pool)["host"] == "h1"
    _goto(page, f"{pool.https_url}/ui/#/vm/{VM}")
    page.wait_for_function("() => document.querySelector('#console-status')?.textContent === 'connected'")
    assert page.inner_text("#vm-host") == "h1"
    _type_until(page, "echo before", "before")
    # A follower of the serial log (`corral vm logs -f`) started before the move goes on from the new host.
    follow_out = pool.homes["control"] / "follow.out"
    with follow_out.open("wb") as out:
        follower = subprocess.Popen(
            [sys.executable, "-m", "corral", "vm", "logs", VM, "--follow", "--lines", "0"],
            env=pool.env(pool.homes["control"]),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _move_and_type_after(pool, page)
        deadline = time.monotonic() + 30
        while b"echo after" not in follow_out.read_bytes():
            assert follower.poll() is None, follow_out.read_text(errors="replace")
            assert time.monotonic() < deadline, f"the log follower missed the move: {follow_out.read_bytes()[-300:]!r}"
            time.sleep(0.5)
    finally:
        follower.terminate()
        follower.wait(10)
    page.wait_for_function("() => document.querySelector('#vm-host')?.textContent === 'h2'", timeout=60_000)
    _shot(page, "console-after-move")


def _move_and_type_after(pool: UiPool, page: Any) -> None:
    # Moved from the page's own form; the page stays, and so does its console.
    page.select_option("#migrate-to", "h2")
    page.click("#migrate button[type=submit]")
    page.wait_for_function(
        "() => (document.querySelector('#console-status')?.textContent || '').startsWith('reconnected')",
        timeout=180_000,
    )
    moved = _vm(pool)
    assert moved["host"] == "h2" and moved["state"] == "running", moved
    _type_until(page, "echo after", "after")
    screen = [line.strip() for line in _screen(page)]
    assert "before" in screen, "the same console, with what it showed before the move"
    # Its run directory (named by the id's first 12 characters) is gone from h1: what answered came from h2.
    assert not (pool.homes["h1"] / "run" / moved["id"][:12]).exists(), "the VM runs on h2 alone"
    assert (pool.homes["h2"] / "run" / moved["id"][:12]).is_dir(), "the VM runs on h2"


def test_a_host_the_control_plane_cannot_reach_is_named_not_called_stopped(pool: UiPool, page: Any) -> None:
    """Without the host's home under the control plane's (a pool on separate machines, no shared mount), the
    console says where the VM runs and what to do, rather than that it is not running; nothing changes."""
    link = pool.homes["control"] / "hosts" / "h2"
    hidden = link.with_name("h2.hidden")
    link.rename(hidden)
    try:
        refused = pool.cli("vm", "console", VM, check=False, timeout=60)
        assert refused.returncode != 0
        error = refused.stderr.strip()
        assert len(error.splitlines()) == 1, error
        assert f"VM {VM} runs on host h2, whose consoles this daemon cannot reach" in error, error
        assert "hosts/h2" in error  # the fix
        _goto(page, f"{pool.https_url}/ui/#/vms")
        _goto(page, f"{pool.https_url}/ui/#/vm/{VM}")
        page.wait_for_function(
            "() => (document.querySelector('#console-status')?.textContent || '').includes('cannot reach')"
        )
        assert _vm(pool)["state"] == "running" and _vm(pool)["host"] == "h2"
    finally:
        hidden.rename(link)
    page.wait_for_function(
        "() => (document.querySelector('#console-status')?.textContent || '').startsWith('reconnected')"
    )
    # The page opened after the move: its first connection replays h2's serial log (what was typed there).
    assert "after" in [line.strip() for line in _screen(page)], _screen(page)[-15:]
