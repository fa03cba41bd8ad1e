"""`corral job ...`: long operations, their progress and their logs."""

from __future__ import annotations

import typer

from corral.cli.common import JSON_OPTION, client, follow_required, print_json, run, table

app = typer.Typer(help="List, follow and cancel jobs.", no_args_is_help=True)


@app.command("list")
def list_jobs(
    limit: int = typer.Option(20, "--limit", "-n"),
    active: bool = typer.Option(False, "--active"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Recent jobs, newest first."""

    def action() -> None:
        with client() as corral:
            jobs = corral.jobs(limit=limit, active=active)
        if as_json:
            print_json(jobs)
            return
        table(
            ["ID", "KIND", "TARGET", "STATE", "PROGRESS", "MESSAGE"],
            [
                [j["id"][:12], j["kind"], j["target_name"], j["state"], f"{j['progress']:.0%}", j["message"][:60]]
                for j in jobs
            ],
        )

    run(action)


@app.command()
def show(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """A job with its log."""

    def action() -> None:
        with client() as corral:
            job = corral.job(job_id)
        if as_json:
            print_json(job)
            return
        print(f"job {job['id']} {job['kind']} {job['target_name']}: {job['state']} ({job['progress']:.0%})")
        for entry in job["log"]:
            print(f"  {entry['at']}  {entry['message']}")
        if job["error"]:
            print(f"  error: {job['error']}")

    run(action)


@app.command()
def wait(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """Wait for a job to finish; exits non-zero if it failed."""

    def action() -> None:
        with client() as corral:
            job = follow_required(corral, {"job": corral.job(job_id)}, f"job {job_id}", quiet=as_json)
        print_json(job) if as_json else print(f"job {job_id}: {job['state']}")

    run(action)


@app.command()
def cancel(job_id: str) -> None:
    """Ask a job to stop."""

    def action() -> None:
        with client() as corral:
            job = corral.cancel_job(job_id)
        print(f"job {job_id}: {job['state']}" + (" (cancel requested)" if job["state"] == "running" else ""))

    run(action)
