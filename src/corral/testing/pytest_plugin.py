"""pytest plugin: every test that asks for ``corral_vm`` gets a fresh, booted VM in a fraction of a second.

The first such test of a session boots a *warm template* (a forkable VM, booted once per image, memory and
network); each test then gets a fork of it (an instant clone: the child resumes the template's memory, with its
own disk overlay, name and MACs), and the fork is deleted after the test, pass or fail. Nothing a test does in
its VM reaches the template or another test's VM. While a test runs, the next test's fork is made in the
background (one spare per template; ``--corral-no-spare`` turns it off), so setup rarely waits for a fork.

    def test_service(corral_vm):
        result = corral_vm.exec(["cat", "/etc/hostname"])
        assert result.exit_code == 0

    @pytest.mark.corral(image="tiny", memory="256M")
    def test_bigger(corral_vm): ...

Options: ``--corral-image`` (default tiny), ``--corral-memory`` (128M), ``--corral-network`` (a corral network
for the VMs' NIC; default QEMU's user network), ``--corral-env-file`` (the corral.yaml of ``corral_env``; default:
the one beside the test file, else the rootdir's). The daemon is the one the CLI would use (CORRAL_URL,
CORRAL_HOME, `corral remote`). With pytest-xdist every worker has its own template and its own names
(``pt-gw0-...``), so workers never touch each other's VMs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from corral.testing.handles import VM

DEFAULT_IMAGE = "tiny"
DEFAULT_MEMORY = "128M"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("corral", "VMs for tests (corral)")
    group.addoption("--corral-image", default=None, help=f"image of corral_vm's VMs (default {DEFAULT_IMAGE})")
    group.addoption("--corral-memory", default=None, help=f"memory of corral_vm's VMs (default {DEFAULT_MEMORY})")
    group.addoption("--corral-network", default=None, help="corral network for the VMs' NIC (default: user)")
    group.addoption(
        "--corral-no-spare", action="store_true", help="do not keep a fork ready for the next test (one VM less)"
    )
    group.addoption("--corral-env-file", default=None, help="corral.yaml for corral_env (default: rootdir's)")
    parser.addini("corral_image", "image of corral_vm's VMs", default=DEFAULT_IMAGE)
    parser.addini("corral_memory", "memory of corral_vm's VMs", default=DEFAULT_MEMORY)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "corral(image=None, memory=None, network=None): the VM corral_vm hands this test"
    )
    config.addinivalue_line("markers", "corral_env(file=None): the corral.yaml corral_env brings up for this test")


class Templates:
    """Warm templates of one session (one per image, memory and network), forked for each test."""

    def __init__(self, corral: Any, prefix: str, spare: bool = True) -> None:
        self.corral = corral
        self.prefix = prefix
        self.templates: dict[tuple[str, str, str | None], str] = {}
        self.children = 0
        self.lock = threading.Lock()
        # One fork kept ready per template, made in the background while a test runs, so the next test's setup
        # does not wait for a fork. Its own SDK client: the test's thread keeps using ``corral``.
        self.spares: dict[str, Future[str]] = {}
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-spare") if spare else None
        self.background_client: Any = None

    def template(self, image: str, memory: str, network: str | None, timeout: float = 300) -> str:
        from corral.client.environments import wait_ready

        key = (image, memory, network)
        with self.lock:
            if key in self.templates:
                return self.templates[key]
            name = f"{self.prefix}-t{len(self.templates)}"
            spec: dict[str, Any] = {"name": name, "image": image, "memory": memory, "forkable": True}
            if network:
                spec["nics"] = [{"network": network}]
            self.templates[key] = name  # recorded first, so teardown removes a half-made one too
            accepted = self.corral.create_vm(spec, start=True, wait=True, ready_timeout=timeout)
            self.corral.wait_job(accepted["job"]["id"], timeout=timeout + 60)
            wait_ready(self.corral, name, timeout)
            # Warm means booted and paused: forks resume its memory, and it takes no CPU from the tests' VMs
            # meanwhile (on TCG an idle guest still costs a few percent of a core).
            paused = self.corral.pause_vm(name)
            if paused and paused.get("job"):
                self.corral.wait_job(paused["job"]["id"], timeout=60)
            return name

    def take(self, template: str) -> str:
        """A fork of ``template`` for one test: the spare made while the previous test ran, else a new one."""
        name = None
        future = self.spares.pop(template, None)
        if future is not None:
            with contextlib.suppress(Exception):  # a spare that failed is replaced by a fork made now
                name = future.result()
        if name is None:
            name = self.fork(template)
        if self.background is not None:
            self.spares[template] = self.background.submit(self._spare, template)
        return name

    def _spare(self, template: str) -> str:
        from corral.client import Client

        if self.background_client is None:
            corral = self.corral
            self.background_client = Client(
                url=corral.url,
                home=None if corral.url else corral.home,
                timeout=60,
                token=corral.token,
                project=corral.project,
            )
        return self.fork(template, corral=self.background_client)

    def fork(self, template: str, timeout: float = 120, corral: Any = None) -> str:
        from corral.client.environments import wait_ready

        corral = corral or self.corral
        with self.lock:
            self.children += 1
            name = f"{self.prefix}-{self.children}"
        accepted = corral.fork_vm(template, name)
        try:
            corral.wait_job(accepted["job"]["id"], timeout=timeout)
            wait_ready(corral, name, timeout)
        except BaseException:
            remove(corral, name)
            raise
        return name

    def close(self) -> None:
        """Spares first (waiting for one still being made), then the templates."""
        for future in self.spares.values():
            with contextlib.suppress(Exception):
                remove(self.corral, future.result(timeout=300))
        self.spares.clear()
        if self.background is not None:
            self.background.shutdown(wait=True)
        if self.background_client is not None:
            self.background_client.close()
        for name in self.templates.values():
            remove(self.corral, name)


def remove(corral: Any, name: str) -> None:
    """Delete a VM and wait until it is gone; a VM already gone is fine (teardown must not mask a failure)."""
    from corral.errors import CorralError

    with contextlib.suppress(CorralError):
        accepted = corral.delete_vm(name, force=True)
        if accepted and accepted.get("job"):
            corral.wait_job(accepted["job"]["id"], timeout=120)


def _prefix() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    return f"pt-{worker}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def corral_client() -> Iterator[Any]:
    """The SDK client the fixtures use (the daemon the CLI would talk to)."""
    from corral.client import Client

    with Client(timeout=60) as corral:
        yield corral


@pytest.fixture(scope="session")
def corral_templates(request: pytest.FixtureRequest, corral_client: Any) -> Iterator[Templates]:
    """The session's warm templates; removed when the session ends."""
    templates = Templates(corral_client, _prefix(), spare=not request.config.getoption("--corral-no-spare"))
    try:
        yield templates
    finally:
        templates.close()


def _choice(request: pytest.FixtureRequest, key: str, option: str, ini: str | None) -> str | None:
    marker = request.node.get_closest_marker("corral")
    if marker is not None and marker.kwargs.get(key):
        return str(marker.kwargs[key])
    value = request.config.getoption(option)
    if value:
        return str(value)
    return str(request.config.getini(ini)) if ini else None


@pytest.fixture
def corral_vm(request: pytest.FixtureRequest, corral_client: Any, corral_templates: Templates) -> Iterator[VM]:
    """A fresh VM for this test, forked from the session's warm template; deleted after the test, pass or fail."""
    image = _choice(request, "image", "--corral-image", "corral_image") or DEFAULT_IMAGE
    memory = _choice(request, "memory", "--corral-memory", "corral_memory") or DEFAULT_MEMORY
    network = _choice(request, "network", "--corral-network", None)
    template = corral_templates.template(image, memory, network)
    name = corral_templates.take(template)
    try:
        yield VM(corral_client, name)
    finally:
        remove(corral_client, name)


class EnvHandle:
    """An environment brought up for one test: ``vms["web"]`` is the file's ``web`` (members as ``app-1``)."""

    def __init__(self, environment: Any, corral: Any) -> None:
        from corral.spec.environment import scoped

        self.environment = environment
        self.name = environment.env
        self.vms = {full.removeprefix(f"{self.name}-"): VM(corral, full) for full in environment.wanted()}
        self.networks = {short: scoped(self.name, short) for short in environment.config.networks}

    def __getitem__(self, name: str) -> VM:
        return self.vms[name]


@pytest.fixture
def corral_env(request: pytest.FixtureRequest, corral_client: Any) -> Iterator[EnvHandle]:
    """A whole corral.yaml brought up under a unique environment name, destroyed after the test."""
    from corral.client.environments import Environment, forget_state
    from corral.spec.environment import load

    marker = request.node.get_closest_marker("corral_env")
    file = (marker.kwargs.get("file") if marker is not None else None) or request.config.getoption("--corral-env-file")
    here = Path(str(request.path)).parent
    path = (
        Path(file)
        if file
        else next(
            (
                folder / "corral.yaml"
                for folder in (here, Path(str(request.config.rootpath)))
                if (folder / "corral.yaml").exists()
            ),
            here / "corral.yaml",
        )
    )
    if not path.is_absolute():
        path = here / path  # a marker's or option's relative path is the test file's neighbour
    config = load(path)
    env = _prefix()
    environment = Environment(corral_client, config.model_copy(update={"name": None}), env, path)
    try:
        environment.up()
        yield EnvHandle(environment, corral_client)
    finally:
        with contextlib.suppress(Exception):
            environment.down(destroy=True)
        forget_state(env)
