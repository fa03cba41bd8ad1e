"""`corral ui`: a short-lived login link to the web console for the local admin.

The link is minted on the daemon's unix socket (only local root can), so it always speaks for root on this host,
whatever remote the CLI is otherwise pointed at. It is good for one login within a minute: the code rides in the
URL's fragment, which browsers never send to a server, and the page trades it at once for an HttpOnly cookie.
"""

from __future__ import annotations

import os

import typer

from corral.cli.common import JSON_OPTION, print_json, run


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)


def ui(
    open_browser: bool = typer.Option(False, "--open", help="Also open the link in this machine's browser."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print a one-time login link (valid for a minute) to the web console at /ui/, as the local admin."""

    def body() -> None:
        from corral.client import Client
        from corral.paths import default_home

        with Client(home=os.environ.get("CORRAL_HOME") or default_home()) as corral:
            answer = corral.request("POST", "/ui/link")
        if as_json:
            print_json(answer)
        else:
            print(answer["url"])
            print(
                f"(one login, within {answer['expires_in']} s; the daemon's certificate is self-signed unless "
                "you gave it one)"
            )
        if open_browser:
            import webbrowser

            webbrowser.open(answer["url"])

    run(body)
