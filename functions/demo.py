"""``paddlefn demo``: the platform with an example tenant and function, called once, and how to call it yourself."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.panel import Panel

from functions.auth import new_key
from functions.client import Client, ClientError
from functions.settings import Settings

console = Console()
TENANT, FUNCTION = "demo", "classify"


def run_demo(*, port: int, data_dir: Path, exit_after: bool) -> None:
    from functions.cli import serve

    admin_key = os.environ.get("PADDLEFN_ADMIN_KEY") or new_key().token
    settings = Settings.from_env(port=port, data_dir=data_dir, admin_key=admin_key)
    tasks: set[asyncio.Task[None]] = set()

    async def after_start(platform: Any) -> None:
        task = asyncio.create_task(_script(settings, admin_key, exit_after))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    serve(settings, after_start)


async def _script(settings: Settings, admin_key: str, exit_after: bool) -> None:
    try:
        async with httpx.AsyncClient(base_url=settings.base_url) as http:
            for _ in range(200):
                try:
                    if (await http.get("/v2/health/live")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        await asyncio.to_thread(_steps, settings, admin_key)
    except Exception as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        os.kill(os.getpid(), signal.SIGINT)
        return
    if exit_after:
        os.kill(os.getpid(), signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT


def _steps(settings: Settings, admin_key: str) -> None:
    url = settings.base_url
    admin = Client(url, admin_key)
    try:
        tenant_key = admin.create_tenant(TENANT)["key"]["key"]
    except ClientError as exc:
        if exc.status != 409:
            raise
        tenant_key = admin.create_key(TENANT, "demo")["key"]  # the tenant exists from an earlier demo
    admin.close()

    model_dir = settings.data_dir / "example-mlp"
    if not (model_dir / "model.pdmodel").exists():
        console.print("building the example model (an MLP with random weights)...")
        subprocess.run([sys.executable, "-m", "runtime.examples", "mlp", str(model_dir)], check=True,
                       capture_output=True, env={**os.environ, "GLOG_minloglevel": "2"})  # fmt: skip

    tenant = Client(url, tenant_key)
    try:
        fn = tenant.function(TENANT, FUNCTION)
    except ClientError:
        console.print(f"deploying {TENANT}/{FUNCTION} (optimise once, golden check)...")
        tenant.deploy(TENANT, FUNCTION, model_dir, {"idle_timeout_s": 60})
        fn = tenant.wait_deployed(TENANT, FUNCTION)
    if fn["status"] != "ready":
        raise RuntimeError(f"the example function did not deploy: {fn['error']}")

    with np.load(model_dir / "example_inputs.npz") as data:
        x = data["x"][:1]
    values = [round(float(v), 3) for v in x.ravel()]
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": values}]}
    answer = tenant.infer(TENANT, FUNCTION, body)
    tenant.close()

    infer_url = f"{fn['url']}/infer"
    curl = (
        f"curl -s {infer_url} -H {shlex.quote('Authorization: Bearer ' + tenant_key)} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"
    )
    console.print(
        Panel.fit(
            f"[bold]function[/bold]  {TENANT}/{FUNCTION} ({fn['state']}; sleeps after 60 s idle)\n"
            f"[bold]URL[/bold]       {infer_url}\n"
            f"[bold]key[/bold]       {tenant_key}\n"
            f"[bold]answer[/bold]    {json.dumps(answer['outputs'][0]['data'])}\n"
            f"[bold]OIP base[/bold]  {url}/t/{TENANT}  (e.g. tritonclient.http.InferenceServerClient"
            f"('{url.removeprefix('http://')}/t/{TENANT}'))",
            title="paddlefn demo",
        )
    )
    print(f"Try it:\n{curl}\n", flush=True)
