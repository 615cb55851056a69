"""What the CLI shows while things happen: ``paddlefn status`` (a live table of functions and capacity) and a
deploy's stages after its upload. Data comes from the control plane through ``Client``; rendering is rich.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from functions.client import Client, ClientError

STYLES = {"warm": "green", "ready": "green", "asleep": "dim", "waking": "yellow", "deploying": "yellow",
          "failed": "red"}  # fmt: skip


def hint(exc: ClientError) -> str:
    """The error's message, with what to do about it where the API cannot know (how the CLI got its key)."""
    if exc.status == 401:
        return f"{exc.message} (pass --key KEY or set PADDLEFN_KEY)"
    if exc.status == 403 and "admin" in exc.message:
        return f"{exc.message} (use the platform's admin key: --key or PADDLEFN_KEY)"
    return exc.message


def state_of(fn: dict[str, Any]) -> str:
    """The state as people read it: a sleeping function with requests waiting for it is waking."""
    if fn.get("status") == "ready" and fn.get("state") == "asleep" and fn.get("in_flight", 0) > 0:
        return "waking"
    return str(fn.get("state") or fn.get("status"))


def snapshot(client: Client, tenant: str | None) -> dict[str, Any]:
    """Functions of TENANT (or of the key's tenant, or of every tenant for an admin key), and capacity."""
    who = client.whoami()
    if tenant:
        tenants = [tenant]
    elif who.get("tenant"):
        tenants = [who["tenant"]]
    else:
        tenants = [t["name"] for t in client.list_tenants()]
    functions = []
    for name in tenants:
        for fn in client.functions(name):
            functions.append({
                "tenant": fn["tenant"], "name": fn["name"], "status": fn["status"], "state": state_of(fn),
                "replicas": fn["replicas"], "in_flight": fn.get("in_flight", 0),
                "last_request_at": fn.get("last_request_at"), "url": fn["url"], "error": fn.get("error"),
            })  # fmt: skip
    return {
        "at": datetime.now(UTC).isoformat(),
        "tenants": tenants,
        "functions": functions,
        "capacity": client.capacity() if who.get("admin") else None,
    }


def _ago(iso: str | None, now: datetime) -> str:
    if not iso:
        return "never"
    seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    if seconds < 60:
        return f"{max(seconds, 0):.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render(snap: dict[str, Any], note: str = "") -> RenderableType:
    now = datetime.fromisoformat(snap["at"])
    title = f"paddlefn status: {', '.join(snap['tenants']) or 'no tenants'}"
    table = Table("function", "state", "replicas", "in flight", "last request", "url / error", title=title,
                  title_justify="left")  # fmt: skip
    for fn in snap["functions"]:
        state = fn["state"]
        detail = Text(fn["error"] or "", style="red") if state == "failed" else Text(fn["url"])
        table.add_row(f"{fn['tenant']}/{fn['name']}", Text(state, style=STYLES.get(state, "")),
                      str(fn["replicas"]), str(fn["in_flight"]), _ago(fn["last_request_at"], now), detail)  # fmt: skip
    if not snap["functions"]:
        table.add_row("no functions yet", "", "", "", "", "paddlefn deploy MODEL --tenant T --name N")
    lines: list[RenderableType] = [table]
    cap = snap.get("capacity")
    if cap:
        workers = cap["workers"]
        lines.append(Text(
            f"workers: {workers.get('in_use', '?')} in use of {workers.get('total', '?')}, "
            f"{workers.get('idle_warm', '?')} pre-warmed idle; warm functions: {len(cap['warm'])}"
        ))  # fmt: skip
    if note:
        lines.append(Text(note, style="dim"))
    return Group(*lines)


def watch(
    client: Client, tenant: str | None, console: Console, interval: float, *, first: dict[str, Any]
) -> None:
    """Refresh the table every INTERVAL seconds until Ctrl-C; a failed refresh is shown and retried."""
    snap, problem = first, ""
    note = f"every {interval:g} s; Ctrl-C to stop"
    with Live(render(snap, note), console=console, refresh_per_second=4, transient=False) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    snap, problem = snapshot(client, tenant), ""
                except ClientError as exc:
                    problem = f"refresh failed, retrying: {hint(exc)}"
                live.update(render(snap, problem or note))
        except KeyboardInterrupt:
            pass


def wait_for_deploy(
    client: Client,
    tenant: str,
    name: str,
    console: Console,
    *,
    quiet: bool = False,
    timeout: float = 600.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the function until its deploy ends, showing the stage the API reports and the time spent."""
    stages = "optimising, converting and running the golden check"
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=quiet,
    ) as bar:  # fmt: skip
        task = bar.add_task(f"{tenant}/{name}: deploying ({stages})", total=None)
        deadline = time.monotonic() + timeout
        while True:
            fn: dict[str, Any] = client.function(tenant, name)
            if fn["status"] != "deploying" or time.monotonic() > deadline:
                bar.update(task, total=1, completed=1, description=f"{tenant}/{name}: {fn['status']}")
                return fn
            if fn.get("stage"):
                bar.update(task, description=f"{tenant}/{name}: {fn['stage']}")
            sleep(0.25)
