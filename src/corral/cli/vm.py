"""`corral vm ...`: the life of a VM."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, fail, follow_job, human_size, print_json, run, table

app = typer.Typer(help="Create, run and manage VMs.", no_args_is_help=True)

IMAGE = typer.Option("tiny", "--image", "-i", help="Image to boot (see `corral image list`).")
CPUS = typer.Option(1, "--cpus", "-c", help="Number of vCPUs.")
MEMORY = typer.Option("256M", "--memory", "-m", help="Guest memory, e.g. 256M or 2G.")
DISKS = typer.Option(None, "--disk", help="Add a blank disk of this size (repeatable), e.g. --disk 2G.")
VOLUMES = typer.Option(None, "--volume", help="Attach an existing volume (repeatable).")
RESTART = typer.Option("never", "--restart", help="Restart policy: never, on-failure or always.")
KERNEL_ARGS = typer.Option("", "--kernel-args", help="Extra kernel command line for direct-boot images.")
FORKABLE = typer.Option(False, "--forkable", help="Keep RAM in a shared file so the VM can be forked.")
TIMEOUT = typer.Option(300.0, "--timeout", help="Seconds to wait for the guest to become ready.")
ON_HOST = typer.Option(None, "--host", help="Place it on this host (see `corral host list`).")
GROUP = typer.Option(None, "--group", help="Placement group: its VMs share a host or avoid each other (--policy).")
POLICY = typer.Option(None, "--policy", help="The group's rule: affinity or anti-affinity (default for a new group).")
ACCEL = typer.Option(None, "--accel", help="Only hosts with this accelerator: kvm or tcg.")
DRY_RUN = typer.Option(False, "--dry-run", help="Show the host it would go to and why others would not; make nothing.")
FIRMWARE = typer.Option(None, "--firmware", help="Boot through bios (SeaBIOS) or uefi (OVMF); default: the image's.")
NICS = typer.Option(None, "--nic", help="A NIC: network=NAME[,mac=MAC] (repeatable); default: one on 'user'.")
CPU_LIMIT = typer.Option(None, "--cpu-limit", help="CPU quota in cores, e.g. 0.5 (default: its vCPU count).")
CPU_WEIGHT = typer.Option(None, "--cpu-weight", help="CPU share under contention, 1-10000 (default 100).")
DISK_READ_BPS = typer.Option(None, "--disk-read-bps", help="Disk read bandwidth limit, e.g. 50M (per second).")
DISK_WRITE_BPS = typer.Option(None, "--disk-write-bps", help="Disk write bandwidth limit, e.g. 20M (per second).")
DISK_IOPS = typer.Option(None, "--disk-iops", help="Disk operations per second limit.")
MAX_MEMORY = typer.Option(None, "--max-memory", help="Memory `vm set` may grow to live, e.g. 1G (default: --memory).")
MAX_CPUS = typer.Option(None, "--max-cpus", help="vCPUs `vm set` may grow to live (default: --cpus).")
HA = typer.Option(False, "--ha", help="Restart it on another host when its host dies (pools; docs/ha.md).")
HA_PRIORITY = typer.Option(0, "--ha-priority", help="With --ha: higher restarts first (-1000..1000).")


def parse_nic(text: str) -> dict[str, Any]:
    """``network=NAME[,mac=MAC]``, or just ``NAME``."""
    nic: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep and not nic and key:
            key, value = "network", key
        if key not in ("network", "mac") or not value or key in nic:
            fail(f"invalid --nic {text!r}", "write network=NAME[,mac=52:54:00:xx:xx:xx]", 2)
        nic[key] = value
    return nic


def _extras(
    nics: list[str] | None,
    cpu_limit: float | None,
    cpu_weight: int | None,
    disk_read_bps: str | None,
    disk_write_bps: str | None,
    disk_iops: int | None,
) -> dict[str, Any]:
    extras: dict[str, Any] = {
        "cpu_limit": cpu_limit,
        "cpu_weight": cpu_weight,
        "disk_read_bps": disk_read_bps,
        "disk_write_bps": disk_write_bps,
        "disk_iops": disk_iops,
    }
    if nics:
        extras["nics"] = [parse_nic(text) for text in nics]
    return {key: value for key, value in extras.items() if value is not None}


def _read_text(path: Path, what: str, limit: int = 64 << 10) -> str:
    """A user's file, read here so a bad path is one clear line before anything is asked of the daemon."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        fail(f"cannot read {what} {path}: {exc.strerror}", "check the path and its permissions", 2)
    if len(data) > limit:
        fail(f"{what} {path} is larger than {limit >> 10} KiB", "is it the right file?", 2)
    try:
        return data.decode()
    except UnicodeDecodeError:
        fail(f"{what} {path} is not text", "give a text file", 2)


def _spec(
    name: str,
    image: str,
    cpus: int,
    memory: str,
    disks: list[str] | None,
    restart: str,
    kernel_args: str,
    forkable: bool,
    ssh_keys: list[Path] | None,
    user_data: Path | None,
    password_login: bool,
) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "cpus": cpus,
        "memory": memory,
        "disks": [{"size": size} for size in disks or []],
        "restart_policy": restart,
        "kernel_args": kernel_args,
        "forkable": forkable,
        "ssh_keys": [_read_text(path, "SSH key file").strip() for path in ssh_keys or []],
        "user_data": _read_text(user_data, "user-data file") if user_data else None,
        "password_login": password_login,
    }


def _ha(ha: bool, priority: int) -> dict[str, Any]:
    if priority and not ha:
        fail("--ha-priority needs --ha", "add --ha, or leave out --ha-priority", 2)
    return {"ha": True, "ha_priority": priority} if ha else {}


def _placement(host: str | None, group: str | None, policy: str | None, accel: str | None) -> dict[str, Any]:
    return {"host": host, "group": group, "policy": policy, "accel": accel}


def _show_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(plan)
        return
    rule = f", group {plan['group']} ({plan['policy']})" if plan.get("group") else ""
    print(
        f"placement ({plan['strategy']}{rule}): "
        + (f"would choose {plan['chosen']}" if plan["chosen"] else "no host can take this VM")
    )
    table(
        ["HOST", "VERDICT", "ALLOCATED", "VCPUS", "MEMORY", "WHY"],
        [
            [
                v["host"],
                "chosen" if v["chosen"] else ("fits" if v["fits"] else "rejected"),
                f"{v['weight']:.0%}",
                v["allocation"].get("cpus", ""),
                v["allocation"].get("memory", ""),
                v["reason"],
            ]
            for v in plan["hosts"]
        ],
    )
    if not plan["chosen"]:
        raise typer.Exit(1)


def _create(
    spec: dict[str, Any],
    volumes: list[str] | None,
    start: bool,
    wait: bool,
    as_json: bool,
    timeout: float,
    template: str | None,
    placement: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> None:
    name = spec["name"]

    def action() -> None:
        with client() as corral:
            accepted = corral.create_vm(
                spec,
                start=start,
                wait=wait,
                volumes=volumes or [],
                template=template,
                ready_timeout=timeout,
                dry_run=dry_run,
                **(placement or {}),
            )
            if dry_run:
                _show_plan(accepted, as_json)
                return
            follow_job(corral, accepted, f"vm {name}", quiet=as_json, timeout=timeout + 60 if wait else None)
            vm = _with_addresses(corral, name)
        if as_json:
            print_json(vm)
        else:
            _summary(vm)

    run(action)


def _with_addresses(corral: Any, name: str, patience: float = 1.0) -> dict[str, Any]:
    """The VM, giving a just-ready guest a moment to report its addresses (queried right after readiness)."""
    import time

    deadline = time.monotonic() + patience
    vm = corral.vm(name)
    while vm["ready"] and not vm["interfaces"] and time.monotonic() < deadline:
        time.sleep(0.05)
        vm = corral.vm(name)
    return vm


def _summary(vm: dict[str, Any]) -> None:
    state = vm["state"] + (" (ready)" if vm["ready"] else "")
    print(f"VM {vm['name']}: {state}")
    addresses = _addresses(vm)
    if addresses:
        print(f"  addresses: {addresses}")
    if vm["state"] in ("running", "paused"):
        print(f"  console:   corral vm console {vm['name']}   (Ctrl-] detaches)")
        print(f"  shell:     corral vm exec {vm['name']} -- uname -a")


def _addresses(vm: dict[str, Any]) -> str:
    return ", ".join(
        address.split("/")[0]
        for iface in vm.get("interfaces", [])
        for address in iface.get("addresses", [])
        if ":" not in address
    )


SSH_KEYS = typer.Option(None, "--ssh-key", help="Public key file for the default user (repeatable; cloud-init).")
USER_DATA = typer.Option(None, "--user-data", help="cloud-config or script to merge into the first boot.")
PASSWORD_LOGIN = typer.Option(False, "--password-login", help="Allow SSH password logins (off by default).")


@app.command()
def create(
    name: str = typer.Argument(..., help="VM name: lowercase letters, digits and '-'."),
    image: str = IMAGE,
    cpus: int = CPUS,
    memory: str = MEMORY,
    disk: list[str] = DISKS,
    volume: list[str] = VOLUMES,
    restart: str = RESTART,
    kernel_args: str = KERNEL_ARGS,
    start: bool = typer.Option(False, "--start", help="Start it once created."),
    wait: bool = typer.Option(False, "--wait", help="With --start: wait until the guest agent answers."),
    template: str = typer.Option(None, "--template", "-t", help="Make a linked clone of this template."),
    forkable: bool = FORKABLE,
    ssh_key: list[Path] = SSH_KEYS,
    user_data: Path = USER_DATA,
    password_login: bool = PASSWORD_LOGIN,
    nic: list[str] = NICS,
    cpu_limit: float = CPU_LIMIT,
    cpu_weight: int = CPU_WEIGHT,
    disk_read_bps: str = DISK_READ_BPS,
    disk_write_bps: str = DISK_WRITE_BPS,
    disk_iops: int = DISK_IOPS,
    max_memory: str = MAX_MEMORY,
    max_cpus: int = MAX_CPUS,
    ha: bool = HA,
    ha_priority: int = HA_PRIORITY,
    firmware: str = FIRMWARE,
    timeout: float = TIMEOUT,
    on_host: str = ON_HOST,
    group: str = GROUP,
    policy: str = POLICY,
    accel: str = ACCEL,
    dry_run: bool = DRY_RUN,
    as_json: bool = JSON_OPTION,
) -> None:
    """Define a VM: its disks are made (a linked overlay of the image or template, plus blank ones)."""
    spec = _spec(name, image, cpus, memory, disk, restart, kernel_args, forkable, ssh_key, user_data, password_login)
    spec.update(_extras(nic, cpu_limit, cpu_weight, disk_read_bps, disk_write_bps, disk_iops))
    spec.update({key: value for key, value in (("max_memory", max_memory), ("max_cpus", max_cpus)) if value})
    spec.update(_ha(ha, ha_priority))
    if firmware is not None:
        spec["firmware"] = firmware
    _create(
        spec,
        volume,
        start,
        wait and start,
        as_json,
        timeout,
        template,
        _placement(on_host, group, policy, accel),
        dry_run,
    )


@app.command("run")
def run_vm(
    name: str = typer.Argument(..., help="VM name."),
    image: str = IMAGE,
    cpus: int = CPUS,
    memory: str = MEMORY,
    disk: list[str] = DISKS,
    volume: list[str] = VOLUMES,
    restart: str = RESTART,
    kernel_args: str = KERNEL_ARGS,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the guest agent answers."),
    template: str = typer.Option(None, "--template", "-t", help="Make a linked clone of this template."),
    forkable: bool = FORKABLE,
    ssh_key: list[Path] = SSH_KEYS,
    user_data: Path = USER_DATA,
    password_login: bool = PASSWORD_LOGIN,
    nic: list[str] = NICS,
    cpu_limit: float = CPU_LIMIT,
    cpu_weight: int = CPU_WEIGHT,
    disk_read_bps: str = DISK_READ_BPS,
    disk_write_bps: str = DISK_WRITE_BPS,
    disk_iops: int = DISK_IOPS,
    max_memory: str = MAX_MEMORY,
    max_cpus: int = MAX_CPUS,
    ha: bool = HA,
    ha_priority: int = HA_PRIORITY,
    firmware: str = FIRMWARE,
    timeout: float = TIMEOUT,
    on_host: str = ON_HOST,
    group: str = GROUP,
    policy: str = POLICY,
    accel: str = ACCEL,
    dry_run: bool = DRY_RUN,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create and start a VM, and wait until its guest is ready."""
    spec = _spec(name, image, cpus, memory, disk, restart, kernel_args, forkable, ssh_key, user_data, password_login)
    spec.update(_extras(nic, cpu_limit, cpu_weight, disk_read_bps, disk_write_bps, disk_iops))
    spec.update({key: value for key, value in (("max_memory", max_memory), ("max_cpus", max_cpus)) if value})
    spec.update(_ha(ha, ha_priority))
    if firmware is not None:
        spec["firmware"] = firmware
    _create(spec, volume, True, wait, as_json, timeout, template, _placement(on_host, group, policy, accel), dry_run)


def _verb(name: str, what: str, call: str, as_json: bool, wait_timeout: float | None = None, **kwargs: Any) -> None:
    def action() -> None:
        with client() as corral:
            accepted = getattr(corral, call)(name, **kwargs)
            job = follow_job(corral, accepted, f"{what} {name}", quiet=as_json, timeout=wait_timeout)
            vm = corral.vm(name)
        if as_json:
            print_json({"vm": vm, "job": job})
        else:
            _summary(vm)

    run(action)


@app.command()
def start(
    name: str,
    wait: bool = typer.Option(False, "--wait", help="Wait until the guest agent answers."),
    timeout: float = TIMEOUT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a stopped VM."""
    _verb(name, "start", "start_vm", as_json, timeout + 60 if wait else None, wait=wait, ready_timeout=timeout)


@app.command()
def stop(
    name: str,
    force: bool = typer.Option(False, "--force", "-f", help="Power off at once, without asking the guest."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds the guest gets before it is forced off."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop a VM: ACPI power-down, then force it off after --timeout."""
    _verb(name, "stop", "stop_vm", as_json, None, force=force, timeout=timeout)


@app.command()
def restart(
    name: str,
    force: bool = typer.Option(False, "--force", "-f", help="Force it off instead of ACPI."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds the guest gets to power off."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the guest agent answers again."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop and start a VM (a fresh QEMU process)."""
    _verb(name, "restart", "restart_vm", as_json, None, force=force, timeout=timeout, wait=wait)


@app.command()
def pause(name: str, as_json: bool = JSON_OPTION) -> None:
    """Freeze a running VM's vCPUs."""
    _verb(name, "pause", "pause_vm", as_json)


@app.command()
def resume(name: str, as_json: bool = JSON_OPTION) -> None:
    """Resume a paused VM."""
    _verb(name, "resume", "resume_vm", as_json)


@app.command()
def migrate(
    name: str,
    to: str = typer.Option(None, "--to", help="Destination host (default: the scheduler chooses)."),
    live: bool = typer.Option(None, "--live/--offline", help="Move it running (default when it runs) or stopped."),
    with_storage: bool = typer.Option(
        None,
        "--with-storage/--shared-storage",
        help="Copy the disks too (default: exactly when the two hosts do not share their storage pool).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Move a VM to another host: live (RAM, and disks without shared storage) or, stopped, on shared storage."""

    def action() -> None:
        with client() as corral:
            accepted = corral.migrate_vm(name, to=to, live=live, with_storage=with_storage)
            job = follow_job(corral, accepted, f"migrate {name}", quiet=as_json)
            vm = corral.vm(name)
        if as_json:
            print_json({"vm": vm, "job": job})
            return
        result = (job or {}).get("result") or {}
        if result:
            print(
                f"VM {name} moved from {result.get('from')} to {result.get('to')} "
                f"in {result.get('total_s', 0):.2f} s, "
                f"downtime {result.get('downtime_ms')} ms (guest paused {result.get('paused_ms')} ms)"
                + (", disks copied" if result.get("with_storage") else "")
            )
        else:
            print(f"VM {name} is now on host {vm['host']}")

    run(action)


@app.command()
def delete(
    name: str,
    keep_disks: bool = typer.Option(False, "--keep-disks", help="Keep its volumes (they stay listed)."),
    force: bool = typer.Option(False, "--force", "-f", help="Delete even if it is running."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete a VM and, unless --keep-disks, its disks."""

    def action() -> None:
        with client() as corral:
            job = follow_job(
                corral, corral.delete_vm(name, keep_disks=keep_disks, force=force), f"delete {name}", quiet=as_json
            )
        if as_json:
            print_json(job)
        else:
            kept = (job or {}).get("result", {}).get("kept_volumes") or []
            print(f"deleted VM {name}" + (f"; kept volumes: {', '.join(kept)}" if kept else ""))

    run(action)


@app.command("list")
def list_vms(as_json: bool = JSON_OPTION) -> None:
    """List VMs."""

    def action() -> None:
        with client() as corral:
            vms = corral.vms()
        if as_json:
            print_json(vms)
            return
        table(
            ["NAME", "STATE", "READY", "CPUS", "MEMORY", "IMAGE", "ADDRESSES", "HOST"],
            [
                [
                    vm["name"],
                    vm["state"],
                    "yes" if vm["ready"] else "no",
                    vm["cpus"],
                    human_size(vm["memory"]),
                    vm["image"],
                    _addresses(vm),
                    vm["host"],
                ]
                for vm in vms
            ],
        )

    run(action)


@app.command()
def show(name: str, as_json: bool = JSON_OPTION) -> None:
    """Show a VM's spec, state, disks and addresses."""

    def action() -> None:
        with client() as corral:
            vm = corral.vm(name)
        if as_json:
            print_json(vm)
            return
        rows = [
            ("name", vm["name"]),
            ("id", vm["id"]),
            ("state", vm["state"]),
            ("desired", vm["desired_state"]),
            ("ready", "yes" if vm["ready"] else "no"),
            ("status", vm["status"] or "-"),
            ("host", vm["host"]),
            ("pid", vm["pid"] or "-"),
            ("image", vm["image"]),
            ("cpus", vm["cpus"]),
            (
                "memory",
                human_size(vm["memory"])
                + (f" (guest has {human_size(vm['memory_actual'])})" if vm.get("memory_actual") else ""),
            ),
            (
                "memory floor",
                human_size(vm["memory_floor"]) + ("" if vm.get("min_memory") else " (default)")
                if vm.get("memory_floor")
                else "-",
            ),
            ("restart", f"{vm['restart_policy']} ({vm['restart_count']} so far)"),
            ("addresses", _addresses(vm) or "-"),
        ]
        for nic in vm.get("nics", []):
            address = f" {nic['ip']}" if nic["ip"] else ""
            rows.append((f"nic {nic['slot']}", f"{nic['network']} {nic['mac']}{address}"))
        for fwd in vm.get("port_forwards", []):
            rows.append(("forward", f"host {fwd['host_port']}/{fwd['protocol']} -> guest {fwd['guest_port']}"))
        for disk in vm["disks"]:
            rows.append((f"disk {disk['name']}", f"{human_size(disk['size'])} {disk['role']} ({disk['state']})"))
        if vm.get("replica"):
            from corral.cli.replication import replica_line

            rows.append(("replica", replica_line(vm["replica"])))
        if vm.get("last_exit") and vm["state"] == "crashed":
            rows.append(("last serial", " | ".join(vm["last_exit"].get("last_serial_lines", [])[-3:]) or "-"))
        table(["FIELD", "VALUE"], rows)

    run(action)


@app.command("exec")
def exec_cmd(
    name: str = typer.Argument(..., help="VM name."),
    command: list[str] = typer.Argument(..., help="Command and arguments, after --."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds the command may run."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a command in the guest through its guest agent; exits with the command's exit code."""

    argv = command[1:] if command[:1] == ["--"] else command

    def action() -> int:
        with client() as corral:
            result = corral.exec_vm(name, argv, timeout=timeout)
        if as_json:
            print_json(result)
        else:
            sys.stdout.write(result.get("stdout", ""))
            sys.stderr.write(result.get("stderr", ""))
        if result.get("exit_code") is None:
            return 128 + int(result.get("signal") or 0)
        return int(result["exit_code"])

    code = run(action)
    raise typer.Exit(code)


@app.command()
def logs(
    name: str,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new output."),
    lines: int = typer.Option(200, "--lines", "-n", help="How many of the last lines to show first."),
) -> None:
    """Print the VM's serial console log."""

    def action() -> None:
        with client() as corral:
            for chunk in corral.vm_logs(name, lines=lines, follow=follow):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()

    run(action)


@app.command()
def console(name: str) -> None:
    """Attach to the VM's serial console; Ctrl-] detaches."""
    from corral.cli.console import attach

    run(lambda: attach(name))


@app.command()
def clone(
    source: str = typer.Argument(..., help="VM to clone."),
    name: str = typer.Argument(..., help="Name of the new VM."),
    linked: bool = typer.Option(False, "--linked/--full", help="Linked (instant, shares a frozen base) or full copy."),
    from_snapshot: str = typer.Option(None, "--from-snapshot", help="Copy the disks as they were at a snapshot."),
    start: bool = typer.Option(False, "--start", help="Start the clone."),
    wait: bool = typer.Option(False, "--wait", help="With --start: wait until its guest agent answers."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Clone a VM with a new identity (name, hostname, MACs, machine id)."""

    def action() -> None:
        with client() as corral:
            accepted = corral.clone_vm(source, name, linked, from_snapshot, start, wait and start)
            follow_job(corral, accepted, f"clone {source} -> {name}", quiet=as_json)
            vm = _with_addresses(corral, name)
        print_json(vm) if as_json else _summary(vm)

    run(action)


@app.command()
def fork(
    source: str = typer.Argument(..., help="A running VM (started --forkable: the fastest forks)."),
    name: str = typer.Argument(..., help="Name of the child (with --count N: NAME-1 ... NAME-N)."),
    count: int = typer.Option(1, "--count", "-n", help="How many children."),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="Return once the children run, before they answer with their new identity."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Instant clone of a running VM: children resume from its current memory and CPU state."""

    def action() -> None:
        with client() as corral:
            accepted = corral.fork_vm(source, name, count, wait=not no_wait)
            job = follow_job(corral, accepted, f"fork {source}", quiet=as_json)
            children = [corral.vm(child) for child in job["result"]["children"]]
        if as_json:
            print_json({"job": job, "children": children})
        else:
            result = job["result"]
            print(
                f"forked {source} into {', '.join(result['children'])}: parent paused "
                f"{result['parent_pause_ms']:.0f} ms, children running after {result['child_ready_ms']:.0f} ms"
            )

    run(action)


def _identity_for(keys: list[str]) -> Path | None:
    """The user's private key whose public half was given to the VM, found among the usual names."""
    wanted = {" ".join(key.split()[:2]) for key in keys}
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        private = Path.home() / ".ssh" / name
        public = private.with_suffix(".pub")
        if private.exists() and public.exists() and " ".join(public.read_text().split()[:2]) in wanted:
            return private
    return None


def _wait_for_sshd(port: int, timeout: float) -> bool:
    """Until the guest's sshd sends its banner: user-mode networking accepts connections before it listens."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                if conn.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


@app.command()
def ssh(
    name: str = typer.Argument(..., help="VM name."),
    command: list[str] = typer.Argument(None, help="Command to run instead of a login shell, after --."),
    user: str = typer.Option("corral", "--user", "-u", help="Guest user (the image's default user)."),
    identity: Path = typer.Option(None, "--identity", "-i", help="Private key (default: the one matching the VM)."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for the guest's SSH server."),
) -> None:
    """SSH into a VM: finds its forwarded port, the user and your key (like `multipass shell`)."""
    import os

    def action() -> dict[str, Any]:
        with client() as corral:
            return corral.vm(name)

    vm = run(action)
    port = vm.get("ports", {}).get("ssh")
    if vm["state"] != "running" or not port:
        fail(f"VM {name} has no SSH port", "its image must support SSH (e.g. debian) and the VM must be running")
    key = identity or _identity_for(vm["spec"].get("ssh_keys", []))
    if not _wait_for_sshd(port, timeout):
        fail(f"VM {name}'s SSH server did not answer within {timeout:.0f} s", f"see `corral vm logs {name}`")
    argv = [
        "ssh",
        "-p",
        str(port),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ]
    if key is not None:
        argv += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    argv.append(f"{user}@127.0.0.1")
    words = command[1:] if command and command[0] == "--" else (command or [])
    try:
        os.execvp("ssh", argv + words)
    except FileNotFoundError:
        fail("ssh is not installed", "apt-get install openssh-client")


from corral.cli import replication as _replication  # noqa: E402 - `vm replicate|replication|failover`
from corral.cli import resize as _resize  # noqa: E402 - registers `vm set` and `vm disk` on this app
from corral.cli import vm_network as _vm_network  # noqa: E402 - registers `vm nic` and `vm port-forward`

_resize.register(app)
_vm_network.register(app, _verb)
_replication.register(app)
