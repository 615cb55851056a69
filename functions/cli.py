"""``paddlefn``: run the platform, and drive it (tenants, keys, functions) from a terminal.

The commands that talk to a running platform find it through ``--url``/``--key`` or ``PADDLEFN_URL``/
``PADDLEFN_KEY``; ``--json`` prints machine-readable output for scripts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from functions.client import Client, ClientError
from functions.settings import Settings, parse_duration
from functions.status_view import hint, snapshot, wait_for_deploy, watch
from functions.status_view import render as render_status

app = typer.Typer(help="Serverless inference for PaddlePaddle models.", no_args_is_help=True)
tenants_app = typer.Typer(help="Create, list and delete tenants (admin key).", no_args_is_help=True)
keys_app = typer.Typer(help="A tenant's API keys.", no_args_is_help=True)
functions_app = typer.Typer(help="List, inspect, reconfigure and delete functions.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(functions_app, name="functions")
edge_app = typer.Typer(
    help="Edge bundles: a function's Paddle Lite model for a CPU device.", no_args_is_help=True
)
app.add_typer(edge_app, name="edge")

console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="PADDLEFN_URL", help="platform base URL")]
KeyOpt = Annotated[str, typer.Option("--key", envvar="PADDLEFN_KEY", help="API key (admin or tenant)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
DEFAULT_URL = "http://127.0.0.1:8080"


def _client(url: str, key: str) -> Client:
    return Client(url or DEFAULT_URL, key or None)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


def _split(ref: str) -> tuple[str, str]:
    tenant, sep, name = ref.partition("/")
    if not sep or not tenant or not name:
        raise _fail(f"'{ref}' should be TENANT/FUNCTION, e.g. acme/classify")
    return tenant, name


def _duration(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


# ------------------------------------------------------------------ running the platform


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="address to listen on [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on [default: 8080]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="state folder [default: .paddlefn]")] = None,
    idle_timeout: Annotated[str | None, typer.Option(help="sleep after this idle time, e.g. 4s, 15m")] = None,
    pool_size: Annotated[int | None, typer.Option(help="pre-warmed workers kept ready [default: 2]")] = None,
    max_workers: Annotated[
        int | None, typer.Option(help="most worker processes [default: what the memory budget holds]")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, gpu or cpu [default: auto]")] = None,
    domain: Annotated[str | None, typer.Option(help="functions answer at FN.TENANT.DOMAIN")] = None,
    max_connections: Annotated[
        int | None, typer.Option(help="most client connections held open [default: 10000]")
    ] = None,
    header_timeout: Annotated[
        str | None, typer.Option(help="time a client has to send a request head [default: 10s]")
    ] = None,
    keep_alive_timeout: Annotated[
        str | None, typer.Option(help="idle time between requests before a close [default: 5s]")
    ] = None,
) -> None:
    """Run the platform: control plane, gateway, scaler and worker pool, on one machine."""
    settings = Settings.from_env(
        host=host, port=port, data_dir=data_dir, idle_timeout_s=_duration(idle_timeout),
        pool_size=pool_size, max_workers=max_workers, device=device, domain=domain,
        max_connections=max_connections, header_timeout_s=_duration(header_timeout),
        keep_alive_timeout_s=_duration(keep_alive_timeout),
    )  # fmt: skip
    serve(settings)


def serve(settings: Settings, after_start: Any = None) -> None:
    import logging

    import uvicorn

    from functions.app import create_app
    from functions.connections import server_protocol
    from functions.platform import Platform

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    platform = Platform(settings)

    async def announce() -> None:
        console.print(f"paddlefn is up at [bold]{settings.base_url}[/bold] (data in {settings.data_dir})")
        if platform.generated_admin_key:
            console.print(
                "[yellow]admin key (shown once; set PADDLEFN_ADMIN_KEY to choose your own):[/yellow]\n"
                f"  {platform.generated_admin_key}"
            )
        if after_start is not None:
            await after_start(platform)

    uvicorn.run(
        create_app(settings, platform, on_started=announce),
        host=settings.host,
        port=settings.port,
        http=server_protocol(settings),  # connection limit and timeouts
        log_level="warning",
        access_log=False,
    )


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    data_dir: Annotated[Path, typer.Option(help="state folder for the demo")] = Path(".paddlefn/demo"),
    exit_after: Annotated[
        bool, typer.Option("--exit", help="stop once the demo call has been answered")
    ] = False,
) -> None:
    """Run the platform with an example tenant and function, call it once, and print how to call it yourself."""
    from functions.demo import run_demo

    run_demo(port=port, data_dir=data_dir, exit_after=exit_after)


@app.command("example-model")
def example_model(
    kind: Annotated[str, typer.Argument(help="mlp, mobilenet_v3_small, resnet50 or multi_io")],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder to write the model into")],
    fmt: Annotated[
        str, typer.Option("--format", help="legacy (model.pdmodel) or pir (model.json)")
    ] = "legacy",
) -> None:
    """Write a ready-to-deploy example model (random weights) with example inputs and outputs."""
    result = subprocess.run(
        [sys.executable, "-m", "runtime.examples", kind, str(out), "--format", fmt],
        capture_output=True,
        text=True,
        env={**os.environ, "GLOG_minloglevel": "2"},
    )
    if result.returncode:
        raise _fail(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "could not build it")
    console.print(f"wrote {kind} to {out}")


# ------------------------------------------------------------------ tenants and keys


@tenants_app.command("create")
def tenants_create(name: str, url: UrlOpt = "", key: KeyOpt = "", as_json: JsonOpt = False) -> None:
    """Create a tenant; prints its first API key (shown once)."""
    result = _call(lambda c: c.create_tenant(name), url, key)
    if as_json:
        print(json.dumps(result))
        return
    console.print(f"tenant [bold]{name}[/bold] created; its API key (shown once):\n  {result['key']['key']}")


@tenants_app.command("list")
def tenants_list(url: UrlOpt = "", key: KeyOpt = "", as_json: JsonOpt = False) -> None:
    """List tenants."""
    rows = _call(lambda c: c.list_tenants(), url, key)
    _table(rows, ["name", "functions", "created_at"], as_json)


@tenants_app.command("delete")
def tenants_delete(name: str, url: UrlOpt = "", key: KeyOpt = "") -> None:
    """Delete a tenant with its keys, functions and artifacts."""
    _call(lambda c: c.delete_tenant(name), url, key)
    console.print(f"tenant {name} deleted")


@keys_app.command("create")
def keys_create(
    tenant: str,
    name: Annotated[str, typer.Option(help="what the key is for")] = "",
    scope: Annotated[list[str] | None, typer.Option(help="invoke and/or manage (repeat)")] = None,
    url: UrlOpt = "",
    key: KeyOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Create an API key for a tenant (shown once)."""
    result = _call(lambda c: c.create_key(tenant, name, scope), url, key)
    if as_json:
        print(json.dumps(result))
        return
    console.print(f"key {result['id']} ({', '.join(result['scopes'])}), shown once:\n  {result['key']}")


@keys_app.command("list")
def keys_list(tenant: str, url: UrlOpt = "", key: KeyOpt = "", as_json: JsonOpt = False) -> None:
    """List a tenant's keys (never their secrets)."""
    rows = _call(lambda c: c.list_keys(tenant), url, key)
    _table(rows, ["id", "name", "scopes", "created_at", "last_used_at", "revoked_at"], as_json)


@keys_app.command("revoke")
def keys_revoke(tenant: str, key_id: str, url: UrlOpt = "", key: KeyOpt = "") -> None:
    """Revoke a key: it stops working at once."""
    _call(lambda c: c.revoke_key(tenant, key_id), url, key)
    console.print(f"key {key_id} revoked")


# ------------------------------------------------------------------ functions


@app.command()
def deploy(
    model: Annotated[Path, typer.Argument(help="model folder, .tar.gz or .zip")],
    tenant: Annotated[str, typer.Option(help="tenant to deploy into")],
    name: Annotated[str, typer.Option(help="function name (becomes part of its URL)")],
    config: Annotated[str | None, typer.Option(help="config as JSON, e.g. '{\"max_scale\": 2}'")] = None,
    idle_timeout: Annotated[
        str | None, typer.Option(help="sleep after this idle time, e.g. 30s, 15m")
    ] = None,
    min_scale: Annotated[int | None, typer.Option(help="replicas kept when idle")] = None,
    max_scale: Annotated[int | None, typer.Option(help="most replicas")] = None,
    device: Annotated[str | None, typer.Option(help="auto, gpu, cpu or lite")] = None,
    fallback: Annotated[
        str | None, typer.Option(help="Paddle Lite fallback: none, cold or capacity [default: none]")
    ] = None,
    batching: Annotated[bool, typer.Option(help="enable dynamic batching")] = False,
    public: Annotated[bool, typer.Option(help="anyone may invoke it without a key")] = False,
    wait: Annotated[bool, typer.Option(help="wait until it is ready or failed")] = True,
    url: UrlOpt = "",
    key: KeyOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Deploy a model as a function; prints its URL."""
    try:
        settings: dict[str, Any] = json.loads(config) if config else {}
    except json.JSONDecodeError as exc:
        raise _fail(f"--config is not valid JSON: {exc}") from None
    for field, value in (
        ("idle_timeout_s", _duration(idle_timeout)), ("min_scale", min_scale),
        ("max_scale", max_scale), ("device", device), ("fallback", fallback),
    ):  # fmt: skip
        if value is not None:
            settings[field] = value
    if batching:
        settings["batching"] = True
    if public:
        settings["public"] = True
    client = _client(url, key)
    try:
        with Progress(
            TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=err, transient=True, disable=as_json,
        ) as bar:  # fmt: skip
            task = bar.add_task("upload", total=None)
            client.deploy(
                tenant, name, model, settings, progress=lambda d, t: bar.update(task, completed=d, total=t)
            )
        fn = (
            wait_for_deploy(client, tenant, name, err, quiet=as_json)
            if wait
            else client.function(tenant, name)
        )
    except ClientError as exc:
        raise _fail(hint(exc)) from None
    finally:
        client.close()
    if as_json:
        print(json.dumps(fn))
    elif fn["status"] == "failed":
        raise _fail(f"deploy failed: {fn['error']}")
    else:
        console.print(f"[green]{fn['status']}[/green] {tenant}/{name}\n  URL: {fn['url']}")
    if fn["status"] == "failed":
        raise typer.Exit(1)


@functions_app.command("list")
def functions_list(tenant: str, url: UrlOpt = "", key: KeyOpt = "", as_json: JsonOpt = False) -> None:
    """List a tenant's functions with their state and replicas."""
    rows = _call(lambda c: c.functions(tenant), url, key)
    _table(rows, ["name", "state", "replicas", "last_request_at", "url", "error"], as_json)


@functions_app.command("show")
def functions_show(
    ref: Annotated[str, typer.Argument(help="TENANT/FUNCTION")],
    url: UrlOpt = "",
    key: KeyOpt = "",
    as_json: Annotated[bool, typer.Option("--json", help="print compact JSON (one line)")] = False,
) -> None:
    """Show one function in full (JSON)."""
    tenant, name = _split(ref)
    fn = _call(lambda c: c.function(tenant, name), url, key)
    print(json.dumps(fn) if as_json else json.dumps(fn, indent=2))


@functions_app.command("stats")
def functions_stats(
    ref: Annotated[str, typer.Argument(help="TENANT/FUNCTION")],
    minutes: Annotated[int, typer.Option(help="how many minutes back")] = 15,
    url: UrlOpt = "",
    key: KeyOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Per-minute requests, errors, cold starts, p50/p99 latency and engines (minutes with requests)."""
    tenant, name = _split(ref)
    stats = _call(lambda c: c.stats(tenant, name, minutes), url, key)
    if as_json:
        print(json.dumps(stats))
        return
    rows = [
        {**b, "engines": [f"{e} {n}" for e, n in b["engines"].items()]}
        for b in stats["buckets"]
        if b["requests"]
    ]
    _table(rows, ["t", "requests", "errors", "cold_starts", "p50_ms", "p99_ms", "engines"], False)


@functions_app.command("update")
def functions_update(
    ref: Annotated[str, typer.Argument(help="TENANT/FUNCTION")],
    config: Annotated[str, typer.Option(help="fields to change, as JSON, e.g. '{\"idle_timeout_s\": 60}'")],
    url: UrlOpt = "",
    key: KeyOpt = "",
) -> None:
    """Change a function's configuration."""
    tenant, name = _split(ref)
    try:
        patch = json.loads(config)
    except json.JSONDecodeError as exc:
        raise _fail(f"--config is not valid JSON: {exc}") from None
    fn = _call(lambda c: c.update_function(tenant, name, patch), url, key)
    console.print(json.dumps(fn["config"]))


@functions_app.command("delete")
def functions_delete(
    ref: Annotated[str, typer.Argument(help="TENANT/FUNCTION")], url: UrlOpt = "", key: KeyOpt = ""
) -> None:
    """Delete a function and its artifacts."""
    tenant, name = _split(ref)
    _call(lambda c: c.delete_function(tenant, name), url, key)
    console.print(f"{ref} deleted")


@app.command()
def invoke(
    ref: Annotated[str, typer.Argument(help="TENANT/FUNCTION")],
    data: Annotated[Path | None, typer.Option(help="OIP request body as a JSON file ('-' for stdin)")] = None,
    example: Annotated[
        Path | None,
        typer.Option(help="model folder whose example_inputs.npz to send (as `example-model` writes)"),
    ] = None,
    url: UrlOpt = "",
    key: KeyOpt = "",
) -> None:
    """Send one Open Inference Protocol request and print the answer."""
    tenant, name = _split(ref)
    if (data is None) == (example is None):
        raise _fail("give exactly one of --data FILE (an OIP JSON body) or --example MODEL_DIR")
    body = _example_body(example) if example is not None else _json_body(data)  # type: ignore[arg-type]
    print(json.dumps(_call(lambda c: c.infer(tenant, name, body), url, key)))


def _json_body(data: Path) -> Any:
    try:
        text = sys.stdin.read() if str(data) == "-" else data.read_text()
        return json.loads(text)
    except OSError as exc:
        raise _fail(f"cannot read {data}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise _fail(f"{data} is not valid JSON: {exc}") from None


def _example_body(model_dir: Path) -> dict[str, Any]:
    import numpy as np

    from runtime.spec import oip_datatype

    path = model_dir / "example_inputs.npz"
    if not path.is_file():
        raise _fail(f"{path} does not exist; `paddlefn example-model KIND -o DIR` writes one")
    with np.load(path) as inputs:
        tensors = {n: inputs[n] for n in inputs.files}
    return {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": oip_datatype(a.dtype), "data": a.ravel().tolist()}
            for n, a in tensors.items()
        ]
    }


# ------------------------------------------------------------------ edge bundles


@edge_app.command("export")
def edge_export(
    ref: Annotated[str, typer.Argument(help="TENANT/FUNCTION")],
    output: Annotated[Path, typer.Option("-o", "--output", help="bundle file to write (.tar.gz)")],
    target: Annotated[str, typer.Option(help="CPU of the edge device: x86 or arm")] = "x86",
    url: UrlOpt = "",
    key: KeyOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Export a function as an edge bundle with its own device key (printed once; the bundle holds it too)."""
    tenant, name = _split(ref)
    if target not in ("x86", "arm"):
        raise _fail(f"--target must be x86 or arm, not {target!r}")
    result = _call(lambda c: c.export_edge_bundle(tenant, name, target, output), url, key)
    if as_json:
        print(json.dumps(result))
        return
    console.print(
        f"wrote {output} (bundle {result['bundle_id']}, {target}); its device key, shown once:\n"
        f"  {result['device_key']}\nserve it with: paddlefn edge serve {output} --port 8080"
    )


@edge_app.command("serve")
def edge_serve(
    bundle: Annotated[Path, typer.Argument(help="bundle file from `paddlefn edge export`")],
    port: Annotated[int, typer.Option(help="port to serve OIP v2 on")] = 8080,
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    platform: Annotated[
        str | None, typer.Option(help="platform URL to upload usage to [default: the bundle's]")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="unpacked model and usage spool [default: ~/.paddlefn-edge/BUNDLE_ID]")
    ] = None,
    upload_interval: Annotated[float, typer.Option(help="seconds between usage uploads")] = 30.0,
) -> None:
    """Serve a bundle over OIP v2 on this CPU, with no platform present; usage is uploaded when reachable."""
    args = [sys.executable, "-m", "runtime.lite.edge", "serve", str(bundle), "--port", str(port),
            "--host", host, "--upload-interval", str(upload_interval)]  # fmt: skip
    if platform:
        args += ["--platform", platform]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    sys.stdout.flush()
    os.execv(sys.executable, args)  # the edge server itself: signals reach it, its exit status is ours


@edge_app.command("devices")
def edge_devices(tenant: str, url: UrlOpt = "", key: KeyOpt = "", as_json: JsonOpt = False) -> None:
    """List a tenant's exported bundles (never their keys)."""
    rows = _call(lambda c: c.edge_devices(tenant), url, key)
    _table(rows, ["bundle_id", "function", "target", "created_at", "last_upload_at", "revoked_at"], as_json)


@edge_app.command("revoke")
def edge_revoke(tenant: str, bundle_id: str, url: UrlOpt = "", key: KeyOpt = "") -> None:
    """Revoke a bundle's device key: its usage uploads are refused from now on."""
    _call(lambda c: c.revoke_edge_device(tenant, bundle_id), url, key)
    console.print(f"bundle {bundle_id} revoked")


# ------------------------------------------------------------------ status


@app.command()
def status(
    tenant: Annotated[
        str | None, typer.Argument(help="tenant [default: the key's, or all for the admin key]")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="print the table once and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0,
    url: UrlOpt = "",
    key: KeyOpt = "",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON snapshot and exit")] = False,
) -> None:
    """Functions with their state, replicas and last request, as a live table (capacity too, for the admin)."""
    client = _client(url, key)
    try:
        first = snapshot(client, tenant)
        if as_json:
            print(json.dumps(first))
        elif once or not console.is_terminal:
            console.print(render_status(first))
        else:
            watch(client, tenant, console, max(interval, 0.2), first=first)
    except ClientError as exc:
        raise _fail(hint(exc)) from None
    finally:
        client.close()


@app.command()
def whoami(url: UrlOpt = "", key: KeyOpt = "", as_json: JsonOpt = False) -> None:
    """Which tenant (or admin) the key belongs to, and its scopes."""
    who = _call(lambda c: c.whoami(), url, key)
    if as_json:
        print(json.dumps(who))
        return
    role = "admin" if who["admin"] else f"tenant {who['tenant']}"
    console.print(f"key {who['key_id']}: {role}, scopes {', '.join(who['scopes'])}")


# ------------------------------------------------------------------ billing


@app.command()
def usage(
    tenant: str,
    start: Annotated[
        str | None, typer.Option(help="ISO 8601 or YYYY-MM-DD [default: start of this month]")
    ] = None,
    end: Annotated[str | None, typer.Option(help="ISO 8601 or YYYY-MM-DD, exclusive [default: now]")] = None,
    group_by: Annotated[str, typer.Option(help="function, device, day or hour")] = "function",
    url: UrlOpt = "",
    key: KeyOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """A tenant's usage: requests, errors, cold starts, compute and bytes."""
    report = _call(lambda c: c.usage(tenant, start, end, group_by), url, key)
    columns = [group_by, "requests", "billable_requests", "errors", "cold_starts", "compute_ms", "billed_ms"]
    if as_json:
        print(json.dumps(report))
        return
    console.print(f"{tenant}: {report['start']} .. {report['end']}")
    _table(report["rows"], columns, False)


@app.command()
def invoice(
    tenant: str,
    period: Annotated[str, typer.Argument(help="month, YYYY-MM (UTC)")],
    csv: Annotated[bool, typer.Option("--csv", help="print CSV")] = False,
    url: UrlOpt = "",
    key: KeyOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """A tenant's invoice for one month: line items per function and device class, allowance, total."""
    if csv:
        print(_call(lambda c: c.invoice_csv(tenant, period), url, key), end="")
        return
    doc = _call(lambda c: c.invoice(tenant, period), url, key)
    if as_json:
        print(json.dumps(doc))
        return
    from functions.billing.pricing import format_money

    table = Table(
        "function", "device", "requests", "compute_ms", "amount", title=f"{tenant} {period} ({doc['status']})"
    )
    for line in doc["lines"]:
        table.add_row(line["function"], line["device"], str(line["requests"]), str(line["compute_ms"]),
                      format_money(line["amount_micros"], doc["currency"]))  # fmt: skip
    console.print(table)
    console.print(f"subtotal {format_money(doc['subtotal_micros'], doc['currency'])}, "
                  f"free allowance -{format_money(doc['free_allowance_micros'], doc['currency'])}, "
                  f"[bold]total {doc['total']}[/bold]")  # fmt: skip


# ------------------------------------------------------------------ helpers


def _call(action: Any, url: str, key: str) -> Any:
    client = _client(url, key)
    try:
        return action(client)
    except ClientError as exc:
        raise _fail(hint(exc)) from None
    finally:
        client.close()


def _table(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else _cell(row[c]) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
