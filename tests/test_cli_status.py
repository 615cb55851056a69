"""The CLI for people and scripts: `paddlefn status` (once, JSON), --json on every read command, deploy with
its progress, errors that say how to fix them, shell completion."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_KEY, make_tenant, wait_for

pytestmark = pytest.mark.slow


def cli(*args: str, url: str = "", key: str = "") -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "PADDLEFN_URL": url, "PADDLEFN_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "functions.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_and_every_read_command_for_scripts(platform, models):
    acme = make_tenant(platform, "acme")
    url, key = platform.url, acme.key

    deployed = cli(
        "deploy", str(models["mlp"]), "--tenant", "acme", "--name", "classify", "--json", url=url, key=key
    )
    fn = as_json(deployed)
    assert (fn["status"], fn["state"]) == ("ready", "warm")
    assert cli("invoke", "acme/classify", "--example", str(models["mlp"]), url=url, key=key).returncode == 0

    snap = as_json(cli("status", "--json", url=url, key=key))
    assert snap["tenants"] == ["acme"] and snap["capacity"] is None  # a tenant key sees no platform capacity
    [row] = snap["functions"]
    assert (row["tenant"], row["name"], row["status"], row["replicas"]) == ("acme", "classify", "ready", 1)
    assert row["state"] == "warm" and row["url"].endswith("/t/acme/v2/models/classify")

    once = cli("status", "--once", url=url, key=key)
    assert once.returncode == 0, once.stderr
    assert "acme/classify" in once.stdout and "warm" in once.stdout

    admin = as_json(cli("status", "--json", url=url, key=ADMIN_KEY))
    assert admin["capacity"]["workers"]["total"] >= 1
    assert [w["function"] for w in admin["capacity"]["warm"]] == ["classify"]

    # after the idle timeout (3 s) the table says asleep
    wait_for(lambda: as_json(cli("status", "acme", "--json", url=url, key=key))["functions"][0]["state"] == "asleep",
             timeout=30, interval=1, what="classify asleep")  # fmt: skip

    month = datetime.now(UTC).strftime("%Y-%m")
    reads = {
        ("tenants", "list"): ADMIN_KEY,
        ("keys", "list", "acme"): key,
        ("functions", "list", "acme"): key,
        ("functions", "show", "acme/classify"): key,
        ("functions", "stats", "acme/classify"): key,
        ("usage", "acme"): key,
        ("invoice", "acme", month): key,
        ("whoami",): key,
    }
    for command, who in reads.items():
        result = cli(*command, "--json", url=url, key=who)
        assert result.returncode == 0, (command, result.stderr)
        assert json.loads(result.stdout) is not None, command
    stats = as_json(cli("functions", "stats", "acme/classify", "--json", url=url, key=key))
    assert stats["totals"]["requests"] == 1 and stats["last"]["engine"] == "paddle-inference"
    assert as_json(cli("whoami", "--json", url=url, key=key))["tenant"] == "acme"


def test_errors_say_what_to_do(platform):
    make_tenant(platform, "acme")
    no_key = cli("status", url=platform.url)
    assert no_key.returncode == 1
    assert "PADDLEFN_KEY" in no_key.stderr and "--key" in no_key.stderr

    other = make_tenant(platform, "globex")
    tenants = cli("tenants", "list", url=platform.url, key=other.key)
    assert tenants.returncode == 1 and "admin key" in tenants.stderr

    away = cli("status", "--once", url="http://127.0.0.1:9", key=ADMIN_KEY)
    assert away.returncode == 1 and "paddlefn up" in away.stderr

    bad_ref = cli("functions", "show", "classify", url=platform.url, key=other.key)
    assert bad_ref.returncode == 1 and "TENANT/FUNCTION" in bad_ref.stderr


def test_shell_completion_works_for_the_installed_command():
    paddlefn = str(Path(sys.executable).parent / "paddlefn")
    env = {
        "PATH": "/usr/bin:/bin",
        "SHELL": "/bin/bash",
    }  # typer falls back to $SHELL when it cannot detect one
    shown = subprocess.run([paddlefn, "--show-completion", "bash"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "complete -o default -F _paddlefn_completion paddlefn" in shown.stdout
    # what bash asks when TAB is pressed after `paddlefn functions `
    asked = {
        **env,
        "_PADDLEFN_COMPLETE": "complete_bash",
        "COMP_WORDS": "paddlefn functions ",
        "COMP_CWORD": "2",
    }
    words = subprocess.run([paddlefn], env=asked, capture_output=True, text=True).stdout.split()
    assert {"list", "show", "stats", "update", "delete"} <= set(words)
