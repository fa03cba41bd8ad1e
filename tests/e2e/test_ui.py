"""The web console in a real browser: Debian's chromium driven by Playwright, against a real daemon (HTTPS) with a
real VM. The tests also take the screenshots that docs/ui.md shows.

One daemon (the e2e suite's HTTPS one), one browser and one VM for the module; a project of its own ("web") so
nothing here meets the access tests' resources.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, require
from tests.secure_daemon import SecureDaemon

CHROMIUM = os.environ.get("CORRAL_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "docs" / "ui"
VM = "web1"


@pytest.fixture(scope="module")
def web(secure: SecureDaemon) -> dict[str, str]:
    """Project "web", a user with an admin and a viewer token there, and the tiny image."""
    secure.cli("image", "build", "tiny", timeout=1800)
    secure.cli("project", "create", "web")
    secure.cli("user", "create", "wendy")
    tokens = {}
    for role in ("admin", "viewer"):
        tokens[role] = secure.cli(
            "token", "create", "--user", "wendy", "--project", "web", "--role", role
        ).stdout.strip()
    return tokens


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (make setup)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is missing (make setup installs the dev extras)")
        raise
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def _context(browser: Any, secure: SecureDaemon, **options: Any) -> Any:
    # The daemon's certificate is self-signed: the browser is told to accept it, as a person clicking through would.
    context = browser.new_context(ignore_https_errors=True, base_url=secure.url, **options)
    context.set_default_timeout(20_000)
    return context


def _login(page: Any, token: str) -> None:
    page.goto("/ui/")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_selector("#nav a")


@pytest.fixture(scope="module")
def admin(browser: Any, secure: SecureDaemon, web: dict[str, str]) -> Iterator[Any]:
    context = _context(browser, secure, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        _login(page, web["admin"])
        yield page
    finally:
        context.close()


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _screen(page: Any) -> list[str]:
    """The console's screen, line by line, as xterm.js holds it."""
    return page.evaluate(
        """() => {
            const buffer = window.corralTerminal.buffer.active;
            const lines = [];
            for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
            return lines;
        }"""
    )


def test_the_shell_is_public_and_the_session_cookie_is_strict(secure, web) -> None:  # type: ignore[no-untyped-def]
    with secure.https() as anonymous:
        shell = anonymous.get("/ui/")
        assert shell.status_code == 200 and "app.js" in shell.text
        assert "frame-ancestors 'none'" in shell.headers["content-security-policy"]
        assert anonymous.get("/ui/vendor/xterm.js").status_code == 200
        assert anonymous.get("/vms").status_code == 401  # the shell is public, the data is not
        # Login needs the console's own header (no login CSRF), and a real token.
        assert anonymous.post("/ui/session", json={"token": web["admin"]}).status_code == 403
        assert anonymous.post("/ui/session", json={"token": "nope"}, headers={"X-Corral-UI": "1"}).status_code == 401
        good = anonymous.post("/ui/session", json={"token": web["admin"]}, headers={"X-Corral-UI": "1"})
        assert good.status_code == 200, good.text
        cookie = good.headers["set-cookie"].lower()
        assert "httponly" in cookie and "secure" in cookie and "samesite=strict" in cookie
        assert web["admin"] not in good.headers["set-cookie"]  # the cookie names a session, not the token
        # The link route is for the unix socket's root alone.
        assert anonymous.post("/ui/link", headers={"X-Corral-UI": "1"}).status_code == 403


def test_log_in_and_create_a_vm_from_the_form(admin, secure) -> None:  # type: ignore[no-untyped-def]
    page = admin
    assert "wendy" in page.inner_text("#who")
    page.wait_for_selector("main[data-page='#/'] #events", state="attached")
    page.click("#nav a[href='#/vms']")
    page.click("#create-vm")
    page.fill("#field-name", VM)
    page.fill("#field-memory", "128M")
    page.select_option("#field-nics", "user")
    _shot(page, "create")
    page.click("form button[type=submit]")
    page.wait_for_url(f"**/ui/#/vm/{VM}")
    page.wait_for_function(
        "() => document.querySelector('#vm-state')?.textContent === 'running'", timeout=120_000, polling=500
    )


def test_bad_input_shows_the_fields_error_and_creates_nothing(admin, secure, web) -> None:  # type: ignore[no-untyped-def]
    page = admin
    page.goto("/ui/#/vms/new")
    page.fill("#field-name", "Bad_Name!")
    page.fill("#field-memory", "128M")
    page.click("form button[type=submit]")
    page.wait_for_function("() => document.querySelector('#error-name').textContent.length > 0")
    assert "Bad_Name!" in page.inner_text("#error-name")
    assert page.get_attribute("#field-name", "aria-invalid") == "true"
    page.fill("#field-name", "web-badmem")
    page.fill("#field-memory", "lots")
    page.click("form button[type=submit]")
    page.wait_for_function("() => document.querySelector('#error-memory').textContent.length > 0")
    assert page.inner_text("#error-name") == ""
    _shot(page, "create-error")
    with secure.https(web["admin"]) as client:
        names = {vm["name"] for vm in client.get("/vms").json()}
    assert names == {VM}


def test_type_in_the_serial_console_and_read_the_answer(admin, secure, web) -> None:  # type: ignore[no-untyped-def]
    page = admin
    with secure.https(web["admin"]) as client:  # booted to its shell: the serial log has something to replay
        deadline = time.monotonic() + 120
        while not client.get(f"/vms/{VM}").json()["ready"] and time.monotonic() < deadline:
            time.sleep(0.5)
    page.goto("/ui/#/vms")  # leave the VM's page, so that opening it again opens a new console
    page.wait_for_selector(f"main a[href='#/vm/{VM}']")
    page.click(f"main a[href='#/vm/{VM}']")
    page.wait_for_function("() => document.querySelector('#console-status')?.textContent === 'connected'")
    # The recent serial output (the boot) is replayed on open, before anything is typed.
    page.wait_for_function(
        """() => {
            const buffer = window.corralTerminal.buffer.active;
            for (let i = 0; i < buffer.length; i++)
                if (buffer.getLine(i).translateToString(true).includes('BusyBox')) return true;
            return false;
        }""",
        timeout=5_000,
    )
    page.click("#console")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        page.keyboard.type("echo hello\n")
        try:
            page.wait_for_function(
                """() => {
                    const buffer = window.corralTerminal.buffer.active;
                    for (let i = 0; i < buffer.length; i++)
                        if (buffer.getLine(i).translateToString(true).trim() === 'hello') return true;
                    return false;
                }""",
                timeout=5_000,
            )
            break
        except Exception:  # the guest's shell may not be up yet: ask again
            continue
    assert "hello" in [line.strip() for line in _screen(page)], _screen(page)[-20:]
    _shot(page, "vm")


def test_snapshots_appear_in_the_tree_and_revert_moves_current(admin) -> None:  # type: ignore[no-untyped-def]
    page = admin
    page.goto(f"/ui/#/vm/{VM}")
    for name in ("before", "after"):
        page.fill("#snapshot-name", name)
        page.click("#snapshot-create")
        page.wait_for_selector(f"li[data-snapshot='{name}'] .current", timeout=120_000)
    # "after" is the child of "before" in the tree.
    assert page.locator("li[data-snapshot='before'] li[data-snapshot='after']").count() == 1
    page.click("li[data-snapshot='before'] > span button:has-text('Revert')")
    page.wait_for_selector("li[data-snapshot='before'] > span > .current", timeout=120_000)
    assert page.locator("li[data-snapshot='after'] .current").count() == 0
    page.locator("#snapshots").scroll_into_view_if_needed()
    _shot(page, "snapshots")


def test_back_up_from_the_vm_page(admin) -> None:  # type: ignore[no-untyped-def]
    page = admin
    page.goto("/ui/#/vms")
    page.wait_for_selector(f"main a[href='#/vm/{VM}']")
    page.click(f"main a[href='#/vm/{VM}']")
    page.wait_for_selector("#backup-create")
    page.click("#backup-create")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#backups td')].some((td) => td.textContent === 'ready')",
        timeout=120_000,
    )


def test_other_pages_render(admin) -> None:  # type: ignore[no-untyped-def]
    page = admin
    for hash_, shot in (
        ("#/", "dashboard"),
        ("#/vms", "vms"),
        ("#/jobs", "jobs"),
        ("#/images", "images"),
        ("#/audit", "audit"),
        ("#/projects", "projects"),
    ):
        page.goto(f"/ui/{hash_}")
        page.wait_for_selector(f"main[data-page='{hash_}']", state="attached")
        assert "Cannot show this page" not in page.inner_text("main")
        assert not page.evaluate("() => [...document.querySelector('main').childNodes].some((n) => n.nodeType === 3)")
        if shot in ("dashboard", "vms", "jobs"):
            _shot(page, shot)


def test_a_viewer_sees_no_buttons_and_a_forged_call_is_refused(browser, secure, web) -> None:  # type: ignore[no-untyped-def]
    context = _context(browser, secure, viewport={"width": 390, "height": 844})  # a phone
    page = context.new_page()
    try:
        _login(page, web["viewer"])
        page.goto("/ui/#/vms")
        page.wait_for_selector(f"main a[href='#/vm/{VM}']")
        assert page.locator("#create-vm").count() == 0
        assert page.locator("main button:has-text('Start selected')").count() == 0
        _shot(page, "viewer-phone")
        page.goto(f"/ui/#/vm/{VM}")
        page.wait_for_selector("#snapshots")
        assert page.locator("#snapshot-create, #console, #vm-stop, #vm-start").count() == 0
        assert not page.evaluate("() => [...document.querySelector('main').childNodes].some((n) => n.nodeType === 3)")
        # The API refuses what the page hides: a call forged from the viewer's own page.
        forged = page.evaluate(
            """async () => {
                const answer = await fetch('/vms', {method: 'POST', credentials: 'same-origin',
                    headers: {'X-Corral-UI': '1', 'Content-Type': 'application/json'},
                    body: JSON.stringify({spec: {name: 'forged', image: 'tiny', memory: '128M'}})});
                return [answer.status, await answer.text()];
            }"""
        )
        assert forged[0] == 403, forged
        cookie = next(c for c in context.cookies() if c["name"] == "corral_ui")
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("() => document.cookie") == ""  # the page's script never sees the session
    finally:
        context.close()
    with secure.https(web["admin"]) as client:
        assert "forged" not in {vm["name"] for vm in client.get("/vms").json()}


def test_a_stolen_ride_on_the_cookie_is_refused(browser, secure, web) -> None:  # type: ignore[no-untyped-def]
    """What a cross-site page could make a logged-in browser send: the cookie without the console's header, or a
    websocket from another origin. Both are refused, even for an admin's session."""
    import websockets.sync.client

    context = _context(browser, secure)
    page = context.new_page()
    try:
        _login(page, web["admin"])
        session = next(c for c in context.cookies() if c["name"] == "corral_ui")["value"]
    finally:
        context.close()
    jar = {"Cookie": f"corral_ui={session}"}
    with secure.https() as client:
        assert client.get("/vms", headers={**jar, "X-Corral-UI": "1"}).status_code == 200
        assert client.get("/vms", headers=jar).status_code == 403  # no header: a cross-site <img> or form
        evil = {**jar, "X-Corral-UI": "1", "Origin": "https://evil.example"}
        assert client.post(f"/vms/{VM}/stop", headers=evil).status_code == 403
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    url = f"wss://127.0.0.1:{secure.port}/vms/{VM}/console?project=web"

    def first_message(origin: str) -> Any:
        headers = {"Cookie": f"corral_ui={session}"}
        with websockets.sync.client.connect(
            url,
            ssl=tls,
            proxy=None,
            additional_headers=headers,
            origin=origin,  # type: ignore[arg-type]
        ) as socket:
            return json.loads(socket.recv(timeout=10))

    with pytest.raises(Exception) as refused:
        first_message("https://evil.example")
    assert "403" in str(refused.value), refused.value
    assert first_message(secure.url) == {"connected": VM}


def test_corral_ui_prints_a_one_time_link_for_root(browser, secure) -> None:  # type: ignore[no-untyped-def]
    link = json.loads(secure.cli("ui", "--json").stdout)
    assert link["url"].startswith(f"https://127.0.0.1:{secure.port}/ui/#code=")
    context = _context(browser, secure)
    page = context.new_page()
    try:
        page.goto(link["url"])
        page.wait_for_selector("#nav a[href='#/hosts']")  # root is a cluster admin
        assert "root" in page.inner_text("#who")
        assert "code=" not in page.url  # the code leaves the address bar at once
        page.goto("/ui/#/hosts")
        page.wait_for_selector("main[data-page='#/hosts'] table")
        _shot(page, "hosts")
        page.goto("/ui/#/tokens")  # cluster admins manage tokens: wendy's are listed, with a revoke button each
        page.wait_for_selector("main[data-page='#/tokens'] table")
        assert page.locator("main td:text-is('wendy')").count() >= 2
        assert page.locator("main button:has-text('Revoke')").count() >= 2
    finally:
        context.close()
    context = _context(browser, secure)
    page = context.new_page()
    try:
        page.goto(link["url"])  # spent
        page.wait_for_selector("#login-error")
        assert "spent or expired" in page.inner_text("#login-error")
    finally:
        context.close()
    with httpx.Client(base_url=secure.url, verify=False) as client:
        assert client.get("/ui/session").status_code == 401
