"""`corral pool show|status|balance|consolidate|plan`, and the usage history and standby commands of `vm` and `host`."""

from __future__ import annotations

import sys
from typing import Any

import typer

from corral.cli.common import JSON_OPTION, client, human_size, print_json, run, table

app = typer.Typer(help="The pool of hosts as a whole.", no_args_is_help=True)


@app.command()
def show(as_json: bool = JSON_OPTION) -> None:
    """Capacity (physical), limit (under the overcommit ratios), allocated, used, and allocated/capacity."""

    def action() -> None:
        with client() as corral:
            pool = corral.pool()
        if as_json:
            print_json(pool)
            return
        print(
            f"hosts: {pool['hosts']} ({pool['online']} online, {pool['unreachable']} unreachable, "
            f"{pool['drained']} drained); VMs: {pool['vms']}"
        )

        def row(label: str, r: dict[str, Any], fmt: Any) -> list[str]:
            return [
                label,
                fmt(r["capacity"]),
                fmt(r["limit"]),
                fmt(r["allocated"]),
                fmt(r["used"]),
                f"{r['overcommit']:.2f}",
            ]

        def cpus(value: float) -> str:
            return f"{value:g}"

        def size(value: float) -> str:
            return human_size(int(value))

        table(
            ["RESOURCE", "CAPACITY", "LIMIT", "ALLOCATED", "USED", "OVERCOMMIT"],
            [row("cpu", pool["cpu"], cpus), row("memory", pool["memory"], size), row("storage", pool["storage"], size)],
        )

    run(action)


@app.command()
def status(as_json: bool = JSON_OPTION) -> None:
    """The automatic modes: balancing, consolidation and ballooning, on or off, and what their last rounds did."""

    def action() -> None:
        with client() as corral:
            report = corral.pool_status()
        if as_json:
            print_json(report)
            return
        rows = []
        for label, key in (("balancing", "auto_balance"), ("consolidation", "auto_consolidate")):
            mode = report[key]
            every = f"every {mode['interval']:g} s" + (
                f", threshold {mode['threshold']}" if mode.get("threshold") is not None else ""
            )
            last = mode["last_round"]
            plan = mode["last_plan"]
            rows.append(
                [
                    label,
                    "on" if mode["enabled"] else "off",
                    every,
                    f"{str(last['at'])[:19].replace('T', ' ')}: {last['outcome']}" if last else "-",
                    f"{plan['id']} ({plan['state']})" if plan else "-",
                ]
            )
        balloon = report["autoballoon"]
        rows.append(
            [
                "ballooning",
                "on" if balloon["enabled"] else "off",
                f"every {balloon['interval']:g} s, target {balloon['target']:.0%}, steps {balloon['step']:.0%}",
                f"{balloon['vms_ballooned']} VM(s) ballooned, {human_size(balloon['bytes_reclaimed'])} held back",
                "-",
            ]
        )
        table(["MODE", "STATE", "SETTINGS", "LAST ROUND", "LAST PLAN"], rows)
        print(f"hosts in standby: {', '.join(report['standby']) or 'none'}")
        opened = [f"{p['id']} ({p['kind']}, {p['state']})" for p in report["open_plans"]]
        print(f"open plans: {', '.join(opened) or 'none'}")

    run(action)


# -- usage history ----------------------------------------------------------------------------------------------

SINCE_OPTION = typer.Option(None, "--since", help="How far back: 30m, 1h, 1d (default 1h; at most 31d).")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{human_size(int(value))}/s"


def _print_history(history: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(history)
        return
    tier = {0: "raw samples", 60: "1-minute averages", 600: "10-minute averages"}.get(history["resolution"], "")
    print(f"{history['kind']} {history['name']} since {history['since']} ({len(history['points'])} points, {tier})")
    rows = []
    for label, key in (("average", "average"), ("peak", "peak")):
        figures = history[key]
        rows.append(
            [
                label,
                "-" if figures["cpu"] is None else f"{figures['cpu']:.2f}",
                human_size(None if figures["memory"] is None else int(figures["memory"])),
                human_size(None if figures["balloon"] is None else int(figures["balloon"])),
                _rate(figures["disk_read"]),
                _rate(figures["disk_write"]),
                _rate(figures["net_rx"]),
                _rate(figures["net_tx"]),
            ]
        )
    table(["", "CPUS BUSY", "MEMORY", "BALLOON", "DISK READ", "DISK WRITE", "NET RX", "NET TX"], rows)


def vm_stats(name: str, since: str = SINCE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """A VM's usage over a window: CPUs busy, memory used, balloon, disk and network I/O (averages, peaks)."""

    def action() -> None:
        with client() as corral:
            _print_history(corral.vm_stats(name, since), as_json)

    run(action)


def host_stats(name: str, since: str = SINCE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """A host's usage over a window: what its VMs use together, and its load average."""

    def action() -> None:
        with client() as corral:
            _print_history(corral.host_stats(name, since), as_json)

    run(action)


def standby(name: str, as_json: bool = JSON_OPTION) -> None:
    """Put an empty host in standby: no placements; the power command, if configured, switches it off."""
    _power(name, "standby_host", as_json, f"host {name} is in standby")


def wake(name: str, as_json: bool = JSON_OPTION) -> None:
    """Take a host out of standby (the wake command, if configured, switches it on)."""
    _power(name, "wake_host", as_json, f"host {name} takes work again")


def _power(name: str, call: str, as_json: bool, message: str) -> None:
    def action() -> None:
        with client() as corral:
            result = getattr(corral, call)(name)
        print_json(result) if as_json else print(message)

    run(action)


def register_vm_commands(vm_app: typer.Typer) -> None:
    vm_app.command("stats")(vm_stats)


def register_host_commands(host_app: typer.Typer) -> None:
    host_app.command("stats")(host_stats)
    host_app.command("standby")(standby)
    host_app.command("wake")(wake)


# -- plans ------------------------------------------------------------------------------------------------------


def _print_plan(plan: dict[str, Any]) -> None:
    summary = plan["summary"]
    print(f"plan {plan['id']} ({plan['kind']}): {plan['state']}" + (f" - {plan['message']}" if plan["message"] else ""))
    if plan["kind"] == "balance":
        print(
            f"imbalance score {summary.get('score_before')} -> {summary.get('score_after')} "
            f"(threshold {summary.get('threshold')}: moves gain at least {summary.get('min_gain')})"
        )
    else:
        reference = "optimum" if summary.get("optimum_hosts_used") is not None else "bound"
        value = summary.get("optimum_hosts_used", summary.get("bound_hosts_used"))
        if value is None:
            value = summary.get("bound_hosts_used")
        check = (
            f"solver {reference}: {value}, gap {summary.get('gap')} ({summary.get('solver')})"
            if summary.get("solver")
            else "no solver check (automatic round)"
        )
        print(
            f"hosts awake {summary.get('hosts_before')} -> {summary.get('hosts_used')} "
            f"({summary.get('hosts_freed')} freed: {', '.join(summary.get('freed', [])) or 'none'}); {check}"
        )
    if plan["moves"]:
        table(
            ["VM", "PROJECT", "FROM", "TO", "STATE", "WHY"],
            [[m["vm"], m["project"], m["from"], m["to"], m["state"], m["reason"]] for m in plan["moves"]],
        )


def _follow(corral: Any, plan: dict[str, Any], as_json: bool) -> dict[str, Any]:
    seen: dict[str, str] = {}

    def progress(update: dict[str, Any]) -> None:
        if as_json:
            return
        for move in update["moves"]:
            if seen.get(move["vm_id"]) != move["state"]:
                seen[move["vm_id"]] = move["state"]
                print(f"{move['vm']}: {move['from']} -> {move['to']}: {move['state']}", file=sys.stderr)

    return corral.wait_plan(plan["id"], on_progress=progress)


def _plan_result(corral: Any, plan: dict[str, Any], as_json: bool, follow: bool) -> None:
    if follow and plan["state"] in ("approved", "running"):
        plan = _follow(corral, plan, as_json)
    if as_json:
        print_json(plan)
    else:
        _print_plan(plan)
    if plan["state"] == "failed":
        from corral.errors import JobFailed

        raise JobFailed(f"plan {plan['id']} failed: {plan['message']}", f"see `corral pool plan show {plan['id']}`")


@app.command()
def balance(
    threshold: int = typer.Option(3, "--threshold", help="1 (only large gains) .. 5 (small gains too)."),
    max_moves: int = typer.Option(10, "--max-moves", help="At most this many migrations."),
    apply: bool = typer.Option(False, "--apply", help="Run the moves now (live migrations, one at a time)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Recommend moves that even out the hosts' load (from the usage history); --apply runs them."""

    def action() -> None:
        with client() as corral:
            _plan_result(corral, corral.balance_pool(threshold, apply, max_moves), as_json, follow=apply)

    run(action)


@app.command()
def consolidate(
    apply: bool = typer.Option(False, "--apply", help="Run the moves, then put the emptied hosts in standby."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Recommend moves that empty the most hosts (N+1 spare kept), checked against HiGHS; --apply runs them."""

    def action() -> None:
        with client() as corral:
            _plan_result(corral, corral.consolidate_pool(apply), as_json, follow=apply)

    run(action)


plan_app = typer.Typer(help="Stored balancing and consolidation plans.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")


@plan_app.command("list")
def plan_list(as_json: bool = JSON_OPTION) -> None:
    """Plans, newest first."""

    def action() -> None:
        with client() as corral:
            items = corral.plans()
        if as_json:
            print_json(items)
            return
        table(
            ["ID", "KIND", "STATE", "MOVES", "CREATED", "MESSAGE"],
            [[p["id"], p["kind"], p["state"], len(p["moves"]), p["created_at"], p["message"]] for p in items],
        )

    run(action)


@plan_app.command("show")
def plan_show(plan_id: str, as_json: bool = JSON_OPTION) -> None:
    """A plan, its scores and each move's state."""

    def action() -> None:
        with client() as corral:
            _plan_result(corral, corral.plan(plan_id), as_json, follow=False)

    run(action)


@plan_app.command("approve")
def plan_approve(plan_id: str, as_json: bool = JSON_OPTION) -> None:
    """Run a recommended plan (refused when the pool changed since it was made), and follow it."""

    def action() -> None:
        with client() as corral:
            _plan_result(corral, corral.approve_plan(plan_id), as_json, follow=True)

    run(action)


@plan_app.command("cancel")
def plan_cancel(plan_id: str, as_json: bool = JSON_OPTION) -> None:
    """Stop a plan: no further move starts (one migrating already finishes)."""

    def action() -> None:
        with client() as corral:
            _plan_result(corral, corral.cancel_plan(plan_id), as_json, follow=False)

    run(action)
