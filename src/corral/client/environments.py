"""Environments from corral.yaml, orchestrated on the client over the SDK (no API of their own).

`up` compares the file with what the daemon has and makes the difference, step by step: networks, then VMs
(created and started, waiting for the guest agent), then provisioning run once through the guest agent's exec.
What `up` made and provisioned is recorded in a small state file per environment (under
``$XDG_STATE_HOME/corral/environments``, or CORRAL_ENV_STATE), so a second `up` changes nothing, `down` finds
members added by `scale`, and `env list` can show every environment this user brought up.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import AlreadyExists, Conflict, CorralError, InvalidInput, NotFound, Timeout
from corral.spec.environment import EnvironmentFile, EnvVM, scoped
from corral.spec.names import validate_name
from corral.spec.sizes import parse_size

StepReport = Callable[["Step"], None]


@dataclass
class Step:
    """One change `up` (or `down`, `scale`) makes or would make."""

    action: str  # create-network, create-vm, fork-vm, start-vm, provision, resize, add-port, delete-vm, ...
    target: str  # the daemon-side (scoped) name
    detail: str = ""
    done: bool = False
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class State:
    """What this client made for an environment: its file, members beyond the file's count, provisioning."""

    env: str
    file: str = ""
    daemon: str = ""
    provisioned: dict[str, str] = field(default_factory=dict)  # scoped VM name -> provision digest
    made: list[str] = field(default_factory=list)  # scoped VM names `up` made: finds those the file dropped
    # `corral scale NAME N`: file entry -> [the file's count when scaled, the count asked]. The file wins again
    # once its count changes, so "edit count and run up" and "corral scale" both work.
    scaled: dict[str, list[int]] = field(default_factory=dict)


def state_dir() -> Path:
    if os.environ.get("CORRAL_ENV_STATE"):
        return Path(os.environ["CORRAL_ENV_STATE"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "corral" / "environments"


def load_state(env: str) -> State:
    validate_name(env, "environment name")
    path = state_dir() / f"{env}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return State(env=env)
    known = {key: data[key] for key in ("file", "daemon", "provisioned", "scaled", "made") if key in data}
    return State(env=env, **known)


def save_state(state: State) -> None:
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{state.env}.json"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(asdict(state), indent=2))
    os.replace(partial, path)


def forget_state(env: str) -> None:
    (state_dir() / f"{env}.json").unlink(missing_ok=True)


def list_states() -> list[State]:
    directory = state_dir()
    if not directory.is_dir():
        return []
    return [load_state(path.stem) for path in sorted(directory.glob("*.json"))]


def wait_ready(corral: Any, name: str, timeout: float = 120.0) -> dict[str, Any]:
    """Until the guest agent answers (a fork's child runs at once, but its agent needs a moment to reconnect)."""
    deadline = time.monotonic() + timeout
    while True:
        vm = corral.vm(name)
        if vm["ready"] and vm["state"] == "running":
            return vm
        if vm["state"] in ("crashed", "stopped") and vm.get("desired_state") != "running":
            raise Conflict(f"VM {name} is {vm['state']}", f"see `corral vm logs {name}`")
        if time.monotonic() > deadline:
            raise Timeout(f"VM {name} was not ready within {timeout:.0f} s", f"see `corral vm logs {name}`")
        time.sleep(0.05)


class Environment:
    """A corral.yaml bound to a daemon (an SDK client) and an environment name."""

    def __init__(self, corral: Any, config: EnvironmentFile, env: str, file: Path | str = "") -> None:
        self.corral = corral
        self.config = config
        self.env = validate_name(config.name or env, "environment name")
        self.file = str(file)
        self.state = load_state(self.env)

    # -- naming -----------------------------------------------------------------------------------------------

    def count(self, name: str) -> int:
        """A group's size: what `corral scale` set, unless the file's count changed since."""
        entry = self.config.vms[name]
        file_count, asked = self.state.scaled.get(name, [entry.count, entry.count])
        return asked if file_count == entry.count else entry.count

    def wanted(self) -> dict[str, tuple[str, EnvVM]]:
        """Every scoped VM name the file asks for -> (file entry name, entry)."""
        wanted: dict[str, tuple[str, EnvVM]] = {}
        for name, entry in self.config.vms.items():
            for member in entry.members(name, self.count(name)):
                wanted[scoped(self.env, member)] = (name, entry)
        return wanted

    def network_names(self) -> dict[str, str]:
        return {scoped(self.env, name): name for name in self.config.networks}

    def spec(self, name: str, entry: EnvVM) -> dict[str, Any]:
        nics = [{"network": net if net == "user" else scoped(self.env, net)} for net in entry.networks]
        spec: dict[str, Any] = {
            "name": name,
            "image": entry.image or "",
            "cpus": entry.cpus,
            "memory": entry.memory,
            "disks": [{"size": size} for size in entry.disks],
            "restart_policy": entry.restart,
            "kernel_args": entry.kernel_args,
            "forkable": entry.is_forkable(),
            "ssh_keys": entry.ssh_keys,
            "user_data": entry.user_data,
        }
        if nics:
            spec["nics"] = nics
        return spec

    # -- what exists ------------------------------------------------------------------------------------------

    def _existing(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        prefix = f"{self.env}-"
        vms = {vm["name"]: vm for vm in self.corral.vms() if vm["name"].startswith(prefix)}
        networks = {net["name"]: net for net in self.corral.networks() if net["name"].startswith(prefix)}
        return vms, networks

    def _extra_members(self, vms: dict[str, dict[str, Any]]) -> list[str]:
        """VMs of this environment's groups that the file no longer asks for, newest (highest number) first."""
        wanted = self.wanted()
        extra = []
        for name, entry in self.config.vms.items():
            base = scoped(self.env, name) + "-"
            for vm_name in vms:
                suffix = vm_name[len(base) :] if vm_name.startswith(base) else ""
                if entry.is_group() and suffix.isdigit() and vm_name not in wanted:
                    extra.append((name, int(suffix), vm_name))
        return [vm_name for _, _, vm_name in sorted(extra, key=lambda item: (item[0], -item[1]))]

    def _orphans(self, vms: dict[str, dict[str, Any]]) -> list[str]:
        """VMs `up` made for entries the file no longer has: reported by `up`, removed by `down --destroy`."""
        known = set(self.wanted()) | set(self._extra_members(vms))
        return [name for name in self.state.made if name in vms and name not in known]

    def status(self) -> list[dict[str, Any]]:
        """Each resource the file names, with what the daemon has for it."""
        vms, networks = self._existing()
        rows: list[dict[str, Any]] = []
        for full, short in self.network_names().items():
            net = networks.get(full)
            rows.append(
                {
                    "kind": "network",
                    "name": full,
                    "entry": short,
                    "state": "missing" if net is None else "present",
                    "subnet": (net or {}).get("subnet") or self.config.networks[short].subnet,
                }
            )
        for full, (short, _entry) in self.wanted().items():
            vm = vms.get(full)
            rows.append(
                {
                    "kind": "vm",
                    "name": full,
                    "entry": short,
                    "state": "missing" if vm is None else vm["state"],
                    "ready": bool(vm and vm["ready"]),
                    "provisioned": full in self.state.provisioned,
                    "addresses": _addresses(vm) if vm else "",
                }
            )
        for full in [*self._extra_members(vms), *self._orphans(vms)]:
            rows.append(
                {
                    "kind": "vm",
                    "name": full,
                    "entry": "",
                    "state": vms[full]["state"] + " (extra)",
                    "ready": vms[full]["ready"],
                    "provisioned": full in self.state.provisioned,
                    "addresses": _addresses(vms[full]),
                }
            )
        return rows

    def plan(self) -> list[Step]:
        """What `up` would change (the diff), in the order it would do it."""
        vms, networks = self._existing()
        steps: list[Step] = []
        for full, short in self.network_names().items():
            net = networks.get(full)
            want = self.config.networks[short]
            if net is None:
                steps.append(Step("create-network", full, f"{want.mode} {want.subnet or '(subnet chosen)'}"))
            elif want.subnet and net.get("subnet") and net["subnet"] != want.subnet:
                steps.append(
                    Step(
                        "needs-recreate",
                        full,
                        f"subnet {net['subnet']} -> {want.subnet}: run `corral down --destroy` then `corral up`",
                    )
                )
        for full in self._extra_members(vms):
            steps.append(Step("delete-vm", full, "beyond the group's count (newest first)"))
        for full in self._orphans(vms):
            steps.append(Step("orphan", full, "no longer in the file: `corral down --destroy` removes it"))
        groups_running: dict[str, str] = {}
        for full, (short, _entry) in self.wanted().items():
            vm = vms.get(full)
            if vm is not None and vm["state"] == "running" and vm["spec"].get("forkable"):
                groups_running.setdefault(short, full)
        for full, (short, entry) in self.wanted().items():
            vm = vms.get(full)
            if vm is None:
                parent = groups_running.get(short) if entry.is_group() else None
                if parent is not None:
                    steps.append(Step("fork-vm", full, f"from {parent}"))
                else:
                    source = f"template {entry.template}" if entry.template else f"image {entry.image}"
                    steps.append(Step("create-vm", full, f"{source}, {entry.memory}, {entry.cpus} vCPU"))
                if entry.provision and parent is None:
                    steps.append(Step("provision", full, f"{len(entry.provision)} command(s)"))
                continue
            if vm["state"] != "running":
                steps.append(Step("start-vm", full, f"it is {vm['state']}"))
            steps.extend(self._drift(full, entry, vm))
            if entry.provision and self.state.provisioned.get(full) != entry.provision_digest():
                changed = "changed" if full in self.state.provisioned else "not yet run"
                steps.append(Step("provision", full, f"{len(entry.provision)} command(s), {changed}"))
        return steps

    def _drift(self, full: str, entry: EnvVM, vm: dict[str, Any]) -> list[Step]:
        """Differences between a VM and its entry: live changes where corral can make them, else a note."""
        steps = []
        spec = vm["spec"]
        if entry.image and spec.get("image") != entry.image and not entry.template:
            steps.append(
                Step(
                    "needs-recreate",
                    full,
                    f"image {spec.get('image')} -> {entry.image}: run `corral down --destroy` then `corral up`",
                )
            )
        changes: dict[str, object] = {}
        if parse_size(entry.memory) != int(spec.get("memory", 0)):
            changes["memory"] = entry.memory
        if entry.cpus != int(spec.get("cpus", 1)):
            changes["cpus"] = entry.cpus
        if changes:
            steps.append(Step("resize", full, ", ".join(f"{key} {value}" for key, value in changes.items())))
        have_nets = [nic["network"] for nic in spec.get("nics", [])]
        want_nets = [net if net == "user" else scoped(self.env, net) for net in entry.networks] or have_nets
        for net in want_nets:
            if net not in have_nets:
                steps.append(Step("add-nic", full, net))
        have_ports = {
            f"{fwd['host_port']}:{fwd['guest_port']}/{fwd['protocol']}" for fwd in vm.get("port_forwards", [])
        }
        for text in entry.ports:
            normal = text if "/" in text else f"{text}/tcp"
            if normal not in have_ports:
                steps.append(Step("add-port", full, normal))
        return steps

    # -- changes ----------------------------------------------------------------------------------------------

    def up(self, report: StepReport | None = None, dry_run: bool = False, timeout: float = 300) -> list[Step]:
        """Make what is missing; a second call finds nothing to do. Returns the steps (done or not)."""
        steps = self.plan()
        if dry_run:
            return steps
        self._check_sources(steps)
        self.state.file = self.file or self.state.file
        self.state.daemon = self.corral.url or str(self.corral.socket_path)
        wanted = self.wanted()
        for step in steps:
            started = time.monotonic()
            if report is not None:
                report(step)
            if step.action == "create-network":
                short = self.network_names()[step.target]
                net = self.config.networks[short]
                self.corral.create_network(step.target, mode=str(net.mode), subnet=net.subnet, dhcp=net.dhcp)
            elif step.action == "create-vm":
                short, entry = wanted[step.target]
                accepted = self.corral.create_vm(
                    self.spec(step.target, entry), start=True, wait=True, template=entry.template, ready_timeout=timeout
                )
                self.corral.wait_job(accepted["job"]["id"], timeout=timeout + 60)
                wait_ready(self.corral, step.target, timeout)
            elif step.action == "fork-vm":
                parent = step.detail.removeprefix("from ")
                self._fork(parent, step.target, timeout)
            elif step.action == "start-vm":
                accepted = self.corral.start_vm(step.target, wait=True, ready_timeout=timeout)
                self.corral.wait_job(accepted["job"]["id"], timeout=timeout + 60)
                wait_ready(self.corral, step.target, timeout)
            elif step.action == "provision":
                self.provision(step.target, wanted[step.target][1])
            elif step.action == "resize":
                self._resize(step, wanted[step.target][1])
            elif step.action == "add-nic":
                accepted = self.corral.add_nic(step.target, step.detail)
                if accepted and accepted.get("job"):
                    self.corral.wait_job(accepted["job"]["id"], timeout=timeout)
            elif step.action == "add-port":
                ports, _, protocol = step.detail.partition("/")
                host_port, guest_port = (int(part) for part in ports.split(":"))
                self.corral.add_port_forward(step.target, host_port, guest_port, protocol or "tcp")
            elif step.action == "delete-vm":
                self._delete(step.target)
            else:  # needs-recreate, orphan: reported, never done behind the user's back
                continue
            if step.action in ("create-vm", "fork-vm") and step.target not in self.state.made:
                self.state.made.append(step.target)
            step.done = True
            step.seconds = round(time.monotonic() - started, 3)
            save_state(self.state)
        save_state(self.state)
        return steps

    def _check_sources(self, steps: list[Step]) -> None:
        """Refuse an unknown image or template before the first step, so a bad file changes nothing."""
        entries = [self.wanted()[step.target][1] for step in steps if step.action == "create-vm"]
        images = {entry.image for entry in entries if entry.image}
        templates = {entry.template for entry in entries if entry.template}
        if images:
            known = {image["name"] for image in self.corral.images()}
            for image in sorted(images - known):
                raise NotFound(f"image {image!r} does not exist", "see `corral image list`, or build it first")
        if templates:
            known = {template["name"] for template in self.corral.templates()}
            for template in sorted(templates - known):
                raise NotFound(f"template {template!r} does not exist", "see `corral template list`")

    def _fork(self, parent: str, child: str, timeout: float) -> None:
        accepted = self.corral.fork_vm(parent, child)
        self.corral.wait_job(accepted["job"]["id"], timeout=timeout)
        wait_ready(self.corral, child, timeout)
        if parent in self.state.provisioned:  # a fork is a copy of a provisioned guest
            self.state.provisioned[child] = self.state.provisioned[parent]

    def _resize(self, step: Step, entry: EnvVM) -> None:
        try:
            accepted = self.corral.resize_vm(step.target, memory=entry.memory, cpus=entry.cpus)
            if accepted and accepted.get("job"):
                self.corral.wait_job(accepted["job"]["id"], timeout=120)
        except CorralError as exc:
            step.action = "needs-restart"
            step.detail += f": {exc.message}"

    def _delete(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            accepted = self.corral.delete_vm(name, force=True)
            if accepted and accepted.get("job"):
                self.corral.wait_job(accepted["job"]["id"], timeout=120)
        self.state.provisioned.pop(name, None)
        if name in self.state.made:
            self.state.made.remove(name)

    def provision(self, name: str, entry: EnvVM) -> None:
        """Run the entry's commands in order through the guest agent; the first failure stops `up`."""
        for argv in entry.commands():
            result = self.corral.exec_vm(name, argv, timeout=600)
            if result.get("exit_code") != 0:
                output = (result.get("stderr") or result.get("stdout") or "").strip().splitlines()[-1:]
                raise CorralError(
                    f"provisioning {name} failed: {' '.join(argv)} exited {result.get('exit_code')}"
                    + (f": {output[0][:200]}" if output else ""),
                    "fix the command in the file and run `corral up` again (it runs provisioning again)",
                )
        self.state.provisioned[name] = entry.provision_digest()

    def down(self, destroy: bool = False, report: StepReport | None = None) -> list[Step]:
        """Stop every VM of the environment (disks kept), or with ``destroy`` delete VMs and networks."""
        vms, networks = self._existing()
        ours = [name for name in vms if name in self.wanted() or name in self._extra_members(vms)]
        ours += self._orphans(vms)
        steps: list[Step] = []
        for name in sorted(ours, reverse=True):
            if destroy:
                step = Step("delete-vm", name)
            elif vms[name]["state"] in ("running", "paused"):
                step = Step("stop-vm", name)
            else:
                continue
            if report is not None:
                report(step)
            if destroy:
                self._delete(name)
            else:
                accepted = self.corral.stop_vm(name, force=True)
                if accepted and accepted.get("job"):
                    self.corral.wait_job(accepted["job"]["id"], timeout=120)
            step.done = True
            steps.append(step)
        if destroy:
            for name in self.network_names():
                if name in networks:
                    step = Step("delete-network", name)
                    if report is not None:
                        report(step)
                    with contextlib.suppress(NotFound):
                        self.corral.delete_network(name)
                    step.done = True
                    steps.append(step)
            forget_state(self.env)
        return steps

    def scale(self, name: str, count: int, report: StepReport | None = None, timeout: float = 300) -> list[Step]:
        """Set a group's size: new members are forks of a running forkable member, removal is newest first."""
        if name not in self.config.vms:
            raise NotFound(f"the file has no VM {name!r}", f"one of: {', '.join(self.config.vms) or '(none)'}")
        if not 1 <= count <= 64:
            raise InvalidInput(f"invalid count {count}", "scale to 1..64 members")
        entry = self.config.vms[name]
        if not entry.is_group():
            raise InvalidInput(f"VM {name} is not a group", f"give it `count: 1` in the file to scale it ({name}-1..)")
        self.state.scaled[name] = [entry.count, count]
        return self.up(report=report, timeout=timeout)


def fork_environment(
    corral: Any,
    source: str,
    new: str,
    isolated: bool = False,
    report: StepReport | None = None,
    timeout: float = 300,
) -> list[Step]:
    """`corral env fork SOURCE NEW`: every running (or paused) VM of ``source`` forked into environment ``new``.

    With ``isolated`` each of its networks is duplicated first: an isolated network with no DHCP server, and the
    children keep their parents' MACs and, in the guest, their addresses, so the copy answers on the same
    addresses as the original while no packet can cross between the two (different bridges, no route). Corral
    keeps subnets unique across a host's routing table, so the copy's record gets a subnet of its own for the
    host side, which its guests never use. Without ``isolated`` the children join the original's networks with
    identities of their own. Nothing is made when a name of the copy is already taken."""
    from corral.spec.environment import load

    validate_name(source, "environment name")
    validate_name(new, "environment name")
    state = load_state(source)
    if not state.file:
        known = ", ".join(s.env for s in list_states()) or "(none)"
        raise NotFound(f"environment {source!r} is unknown", f"fork one that `corral up` made: {known}")
    if (state_dir() / f"{new}.json").exists():
        raise AlreadyExists(
            f"environment {new!r} already exists", f"choose another name, or `corral down --env {new} --destroy` it"
        )
    config = load(state.file).model_copy(update={"name": None})
    original = Environment(corral, config, source, state.file)
    vms, networks = original._existing()
    members = [
        name
        for name in sorted(vms)
        if (name in original.wanted() or name in original._extra_members(vms))
        and vms[name]["state"] in ("running", "paused")
    ]
    if not members:
        raise Conflict(f"environment {source!r} has no running VM to fork", f"run `corral up --env {source}` first")
    copies = {name: new + name[len(source) :] for name in members}
    nets = {full: scoped(new, short) for full, short in original.network_names().items() if full in networks}
    nets = nets if isolated else {}
    taken = set(vms) | {vm["name"] for vm in corral.vms()} | {net["name"] for net in corral.networks()}
    clash = sorted(name for name in [*copies.values(), *nets.values()] if name in taken)
    if clash:
        raise AlreadyExists(f"{', '.join(clash)} already exist(s)", "choose another name for the copy")
    for name in [*copies.values(), *nets.values()]:
        validate_name(name, "VM or network name")
    copy_state = State(env=new, file=state.file, daemon=state.daemon, scaled=dict(state.scaled))
    steps: list[Step] = []

    def run(step: Step, action: Callable[[], None]) -> None:
        started = time.monotonic()
        if report is not None:
            report(step)
        action()
        step.done, step.seconds = True, round(time.monotonic() - started, 3)
        steps.append(step)
        save_state(copy_state)  # at each step: a copy that fails half-way is still removed by `down --destroy`

    for full, target in nets.items():

        def make_network(target: str = target) -> None:
            accepted = corral.create_network(target, mode="isolated", dhcp=False)
            if accepted and accepted.get("job"):
                corral.wait_job(accepted["job"]["id"], timeout=timeout)

        run(Step("create-network", target, f"isolated copy of {full}: no DHCP, no route out"), make_network)
    for name, target in copies.items():

        def make_vm(name: str = name, target: str = target) -> None:
            copy_state.made.append(target)
            save_state(copy_state)
            accepted = corral.fork_vm(name, target, networks=nets or None, keep_macs=bool(nets))
            corral.wait_job(accepted["job"]["id"], timeout=timeout)
            wait_ready(corral, target, timeout)
            if name in state.provisioned:  # a fork is a copy of a provisioned guest
                copy_state.provisioned[target] = state.provisioned[name]

        run(Step("fork-vm", target, f"from {name}"), make_vm)
    return steps


def _addresses(vm: dict[str, Any]) -> str:
    return ", ".join(
        address.split("/")[0]
        for iface in vm.get("interfaces", [])
        for address in iface.get("addresses", [])
        if ":" not in address
    )
