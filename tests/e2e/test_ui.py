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
import subprocess
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
NET = "webnet"


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


def _goto(page: Any, url: str | None) -> None:
    """A full page load (``url`` None: reload). Chromium aborts one with ERR_NETWORK_CHANGED when the host's
    interfaces change (a network test's bridge coming or going): that load is made again, as a person would."""
    for attempt in range(3):
        try:
            page.goto(url) if url is not None else page.reload()
            return
        except Exception as error:
            if "ERR_NETWORK_CHANGED" not in str(error) or attempt == 2:
                raise


def _login(page: Any, token: str) -> None:
    _goto(page, "/ui/")
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


def _shot(page: Any, name: str, mask: tuple[str, ...] = ()) -> None:
    """``mask``: selectors painted over in the picture (a token's secret never goes into the docs)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True, mask=[page.locator(selector) for selector in mask])


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
        timeout=30_000,
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


def test_back_up_and_restore_from_the_vm_page(admin, secure, web) -> None:  # type: ignore[no-untyped-def]
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
    # Restore it as a new VM from the form the row's button opens: a bad name first, refused next to its field.
    page.click("#backups button:has-text('Restore')")
    page.fill("#restore-as_name", "Bad!")
    page.click("#restore button[type=submit]")
    page.wait_for_function("() => document.querySelector('#restore-as_name-error').textContent.length > 0")
    assert "Bad!" in page.inner_text("#restore-as_name-error")
    with secure.https(web["admin"]) as client:
        try:
            page.fill("#restore-as_name", f"{VM}-restored")
            page.click("#restore button[type=submit]")
            page.wait_for_selector("#toast div:has-text('restore full-'):has-text('succeeded')", timeout=120_000)
            assert f"{VM}-restored" in {vm["name"] for vm in client.get("/vms").json()}
        finally:
            _delete(client, f"/vms/{VM}-restored", f"{VM}-restored")


def _wait_jobs(client: httpx.Client, target: str, timeout: float = 120) -> None:
    """Until no job of ``target`` is queued or running (the API's long-poll, not a sleep)."""
    for job in client.get("/jobs", params={"active": "true"}).json():
        if job["target_name"] == target:
            client.get(f"/jobs/{job['id']}", params={"wait": timeout, "version": job["version"]}, timeout=timeout + 30)


def _delete(client: httpx.Client, path: str, target: str) -> None:
    """Remove what a test made, once its own jobs are done, and wait for the removal."""
    _wait_jobs(client, target)
    answer = client.delete(path)
    assert answer.status_code in (202, 204, 404), answer.text
    _wait_jobs(client, target)


def test_import_an_image_by_upload(admin, secure, web, tmp_path) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    uploads = secure.home / "uploads" / "web"
    page = admin
    page.goto("/ui/#/images")
    page.wait_for_selector("main[data-page='#/images']", state="attached")
    page.click("#import-image > summary")
    page.set_input_files("#import-file", str(disk))
    page.fill("#import-name", "Blank!")  # refused by the import, after the upload: the upload is dropped too
    page.click("#import button[type=submit]")
    page.wait_for_function("() => document.querySelector('#import-name-error').textContent.length > 0")
    assert "Blank!" in page.inner_text("#import-name-error")
    assert not uploads.exists() or not list(uploads.iterdir())
    with secure.https(web["admin"]) as client:
        try:
            page.fill("#import-name", "blank")
            page.click("#import button[type=submit]")
            page.wait_for_function(
                """() => [...document.querySelectorAll('#image-list tr')].some(
                    (row) => row.textContent.startsWith('blank') && row.textContent.includes('ready'))""",
                timeout=60_000,
            )
            image = client.get("/images/blank").json()
            assert image["virtual_size"] == 64 << 20 and image["source"].startswith("upload:")
        finally:
            _delete(client, "/images/blank", "blank")


def _root_page(browser: Any, secure: SecureDaemon) -> tuple[Any, Any]:
    """A browser logged in as root with a `corral ui` link: a cluster admin, who sees every project."""
    context = _context(browser, secure, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    for attempt in range(2):  # a login cut by a network change (see _goto) is made again, with a new link
        _goto(page, json.loads(secure.cli("ui", "--json").stdout)["url"])
        page.wait_for_selector("#nav a[href='#/hosts'], #login-error:not(:empty)")
        if page.locator("#nav a[href='#/hosts']").is_visible() or attempt == 1:
            break
    page.wait_for_selector("#nav a[href='#/hosts']")
    return context, page


def test_the_project_switcher_changes_the_vm_list(admin, browser, secure, web) -> None:  # type: ignore[no-untyped-def]
    # wendy's tokens are for "web" only: no switcher, the project is shown.
    assert admin.inner_text("#project-current") == "project web"
    assert admin.locator("#project").count() == 0
    context, page = _root_page(browser, secure)
    try:
        assert page.input_value("#project") == "default"
        page.goto("/ui/#/vms")
        page.wait_for_selector("main[data-page='#/vms']", state="attached")
        assert page.locator(f"main a[href='#/vm/{VM}']").count() == 0  # web1 is web's, not default's
        page.select_option("#project", "web")
        page.wait_for_selector(f"main a[href='#/vm/{VM}']")
        _shot(page, "project-switcher")
        _goto(page, None)  # a new load: the choice lasts for the tab
        page.wait_for_selector(f"main a[href='#/vm/{VM}']")
        assert page.input_value("#project") == "web"
        page.select_option("#project", "default")
        page.wait_for_selector("main[data-page='#/vms']", state="attached")  # drawn again, in default
        assert page.locator(f"main a[href='#/vm/{VM}']").count() == 0
    finally:
        context.close()


def test_projects_and_tokens_from_their_forms(browser, secure, web) -> None:  # type: ignore[no-untyped-def]
    context, page = _root_page(browser, secure)
    try:
        page.goto("/ui/#/projects")
        page.wait_for_selector("main[data-page='#/projects']", state="attached")
        page.click("#create-project > summary")
        page.fill("#project-name", "web-two")
        page.fill("#project-max_vms", "lots")
        page.click("#project button[type=submit]")
        page.wait_for_function("() => document.querySelector('#project-max_vms-error').textContent.length > 0")
        assert "lots" in page.inner_text("#project-max_vms-error")
        page.fill("#project-max_vms", "2")
        page.fill("#project-max_memory", "a lot")
        page.click("#project button[type=submit]")
        page.wait_for_function("() => document.querySelector('#project-max_memory-error').textContent.length > 0")
        assert page.inner_text("#project-max_vms-error") == ""
        assert secure.cli("project", "show", "web-two", check=False).returncode != 0  # nothing made by either
        page.fill("#project-max_memory", "1G")
        page.click("#project button[type=submit]")
        page.wait_for_selector("#project-list td:text-is('web-two')")
        page.wait_for_selector("#project option[value='web-two']", state="attached")  # and in the switcher
        # A token: its secret shown once, and it works.
        page.goto("/ui/#/tokens")
        page.wait_for_selector("main[data-page='#/tokens']", state="attached")
        page.click("#create-token > summary")
        page.fill("#token-user", "wendy")
        page.select_option("#token-project", "web")
        page.select_option("#token-role", "viewer")
        page.fill("#token-expires", "forever")
        page.click("#token button[type=submit]")
        page.wait_for_function("() => document.querySelector('#token-expires-error').textContent.length > 0")
        assert page.inner_text("#token-secret") == ""
        page.fill("#token-expires", "1h")
        page.click("#token button[type=submit]")
        page.wait_for_selector("#token-secret code")
        secret = page.inner_text("#token-secret code").strip()
        _shot(page, "token-created", mask=("#token-secret code",))
        with secure.https(secret) as client:
            assert client.get("/vms").status_code == 200
            assert client.post("/vms/web1/stop").status_code == 403  # a viewer's token, as asked
    finally:
        context.close()
        secure.cli("project", "delete", "web-two", check=False)


def test_clone_and_fork_from_the_vm_page(admin, secure, web) -> None:  # type: ignore[no-untyped-def]
    page = admin
    # The page draws the usage history it finds when it opens; the agent records a VM's first point at its
    # host's next 10 s round, which may come after a VM this young is opened: wait for it as a user would.
    with secure.https(web["admin"]) as client:
        deadline = time.monotonic() + 40
        while not client.get(f"/vms/{VM}/stats", params={"since": "1h"}).json().get("points"):
            assert time.monotonic() < deadline, "no usage point for the VM within 40 s"
            time.sleep(0.5)
    page.goto(f"/ui/#/vm/{VM}")
    page.wait_for_selector(f"main[data-page='#/vm/{VM}']", state="attached")
    # The usage graphs, drawn by uPlot from the usage history (the agents sample every 10 s).
    page.wait_for_function("() => document.querySelectorAll('#graphs .graph').length === 4")
    assert page.locator("#graphs canvas").count() >= 4, page.inner_text("#graphs")
    assert "CPU:" in page.inner_text("#graphs")
    page.locator("#graphs").scroll_into_view_if_needed()
    _shot(page, "graphs")
    # A fork's bad count is refused next to its field, and nothing is made.
    page.click("#vm-fork > summary")
    page.fill("#fork-name", f"{VM}-fork")
    page.fill("#fork-count", "0")
    page.click("#fork button[type=submit]")
    page.wait_for_function("() => document.querySelector('#fork-count-error').textContent.length > 0")
    assert "count" in page.inner_text("#fork-count-error")
    with secure.https(web["admin"]) as client:
        try:
            page.click("#vm-clone > summary")
            page.fill("#clone-name", f"{VM}-copy")
            _shot(page, "clone")
            page.click("#clone button[type=submit]")
            page.wait_for_url(f"**/ui/#/vm/{VM}-copy")
            page.wait_for_function(
                "() => document.querySelector('#vm-state')?.textContent === 'stopped'", timeout=120_000, polling=500
            )
            names = {vm["name"] for vm in client.get("/vms").json()}
            assert names == {VM, f"{VM}-copy"}
            # The stopped copy becomes a template from its own page, listed on the images page.
            page.click("#vm-template > summary")
            page.fill("#template-name", "web-base")
            page.click("#template button[type=submit]")
            page.wait_for_selector("#toast div:has-text('template web-base'):has-text('succeeded')", timeout=120_000)
            page.click("#nav a[href='#/images']")
            page.wait_for_selector("#template-list td:text-is('web-base')")
        finally:
            _delete(client, "/templates/web-base", "web-base")
            _delete(client, f"/vms/{VM}-copy", f"{VM}-copy")


def _visit(page: Any, hash_: str) -> None:
    """Open a page from the navigation bar, and wait until it is drawn."""
    page.click(f"#nav a[href='{hash_}']")
    page.wait_for_selector(f"main[data-page='{hash_}']", state="attached")


def test_the_dashboard_warns_of_a_nearly_full_quota(admin, secure) -> None:  # type: ignore[no-untyped-def]
    page = admin
    secure.cli("project", "set", "web", "--max-vms", "1")  # web1 alone fills it
    try:
        _visit(page, "#/jobs")
        _visit(page, "#/")
        assert "project web: VMs 1 of 1 (100% of its quota)" in page.inner_text("#alerts")
    finally:
        secure.cli("project", "set", "web", "--max-vms", "none")
    _visit(page, "#/jobs")
    _visit(page, "#/")
    assert page.locator("main .alert.quota").count() == 0


def test_other_pages_render(admin) -> None:  # type: ignore[no-untyped-def]
    page = admin
    for hash_, shot in (
        ("#/", "dashboard"),
        ("#/vms", "vms"),
        ("#/jobs", "jobs"),
        ("#/images", "images"),
        ("#/networks", "networks-list"),
        ("#/audit", "audit"),
        ("#/projects", "projects"),
    ):
        page.goto(f"/ui/{hash_}")
        page.wait_for_selector(f"main[data-page='{hash_}']", state="attached")
        assert "Cannot show this page" not in page.inner_text("main")
        assert not page.evaluate("() => [...document.querySelector('main').childNodes].some((n) => n.nodeType === 3)")
        if shot in ("dashboard", "vms", "jobs", "images"):
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
        assert page.locator("#vm-copies, #vm-clone, #vm-fork, #resize, #migrate, #backup-create").count() == 0
        for hash_ in ("#/networks", "#/images", "#/projects"):  # no create form on the list pages either
            page.goto(f"/ui/{hash_}")
            page.wait_for_selector(f"main[data-page='{hash_}']", state="attached")
            assert page.locator("main details.creator, main form, main button.danger").count() == 0, hash_
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
        forged = page.evaluate(
            """async () => {
                const answer = await fetch('/networks', {method: 'POST', credentials: 'same-origin',
                    headers: {'X-Corral-UI': '1', 'Content-Type': 'application/json'},
                    body: JSON.stringify({name: 'forged'})});
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
        assert "forged" not in {net["name"] for net in client.get("/networks").json()}


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


def test_create_a_network_from_the_form_and_a_bad_subnet_creates_nothing(admin, secure, web) -> None:  # type: ignore[no-untyped-def]
    """Last in the module: a bridge coming and going makes Chromium abort its loads (ERR_NETWORK_CHANGED)."""
    page = admin
    page.goto("/ui/#/networks")
    page.wait_for_selector("main[data-page='#/networks']", state="attached")
    page.click("#create-network > summary")
    page.fill("#net-name", NET)
    page.select_option("#net-mode", "isolated")
    page.fill("#net-subnet", "10.213.77.1/24")  # host bits set: the API refuses it, naming the field
    page.click("#net button[type=submit]")
    page.wait_for_function("() => document.querySelector('#net-subnet-error').textContent.length > 0")
    assert "10.213.77.1/24" in page.inner_text("#net-subnet-error")
    assert page.get_attribute("#net-subnet", "aria-invalid") == "true"
    assert page.inner_text("#net-name-error") == ""
    _shot(page, "network-error")
    with secure.https(web["admin"]) as client:
        assert NET not in {net["name"] for net in client.get("/networks").json()}
        try:
            page.fill("#net-subnet", "10.213.77.0/24")
            page.click("#net button[type=submit]")
            page.wait_for_selector(f"#network-list td:text-is('{NET}')")
            assert page.inner_text("#net-subnet-error") == ""
            # Listed at once, and ready when its job ends (the page refreshes the list then).
            page.wait_for_function(
                f"""() => [...document.querySelectorAll('#network-list tr')].some(
                    (row) => row.textContent.startsWith('{NET}') && row.textContent.includes('ready'))""",
                timeout=60_000,
            )
            _shot(page, "networks")
            shown = {net["name"]: net for net in client.get("/networks").json()}
            assert shown[NET]["subnet"] == "10.213.77.0/24" and shown[NET]["mode"] == "isolated"
        finally:
            _delete(client, f"/networks/{NET}", NET)
