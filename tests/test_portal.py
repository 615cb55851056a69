"""The portal in a real browser (Debian's Chromium, headless, driven by Playwright): sign in, deploy through the
page, watch the function go warm and asleep, see requests in the charts and the usage, the admin view, and
keyboard-only use. Screenshots go to test-artifacts/portal/.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, deploy, example, make_tenant, oip_body

CHROMIUM = os.environ.get("PADDLEFN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "portal"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (make test does)",
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is a dev dependency")
    with sync_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield instance
        finally:
            instance.close()


# Reports every Content-Security-Policy violation to the console, where the page fixture collects it.
REPORT_CSP = """document.addEventListener("securitypolicyviolation",
  (e) => console.error(`CSP violation: ${e.effectiveDirective} blocked ${e.blockedURI || "inline"}`));"""


@pytest.fixture
def csp_violations() -> list[str]:
    """What the browser refused under the platform's Content-Security-Policy during the test."""
    return []


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest, csp_violations: list[str]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    context.add_init_script(REPORT_CSP)
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_console(message: Any) -> None:
        if message.type == "error" and ("Content Security Policy" in message.text or "CSP" in message.text):
            csp_violations.append(message.text)

    page.on("console", on_console)
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-last.png"), full_page=True)
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not csp_violations, (
        f"the browser refused under the page's Content-Security-Policy: {csp_violations}"
    )


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def expect() -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect


def sign_in(page: Any, url: str, key: str) -> None:
    page.goto(f"{url}/ui/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def archive(model: Path, out: Path) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    out.write_bytes(buffer.getvalue())
    return out


def test_tenant_deploys_through_the_page_and_sees_state_requests_and_usage(platform, models, page, tmp_path):
    acme = make_tenant(platform, "acme")
    model = archive(models["mlp"], tmp_path / "mlp.tar.gz")
    see = expect()

    sign_in(page, platform.url, acme.key)
    see(page.get_by_role("heading", level=1)).to_have_text("Functions of acme")
    see(page.locator("#functions-table + p")).to_contain_text("No functions yet")
    shot(page, "01-signed-in")

    # deploy by upload: the bar goes through the upload, then the stages end in "ready"
    page.get_by_role("link", name="Deploy", exact=True).click()
    page.get_by_label("Function name").fill("classify")
    page.get_by_label("Model archive").set_input_files(str(model))
    page.get_by_role("button", name="Deploy").click()
    see(page.locator("#deploy-status")).to_be_visible()
    see(page.locator('#deploy-stages li[data-stage="ready"]')).to_have_attribute(
        "data-state", "done", timeout=120_000
    )
    see(page.locator("#deploy-progress")).to_have_attribute("value", "100")
    see(page.locator("#deploy-stage")).to_contain_text("classify is ready")
    shot(page, "02-deployed")

    # the list shows it warm (a deploy leaves a replica), then asleep after the 3 s idle timeout
    page.get_by_role("link", name="Functions", exact=True).click()
    state = page.locator('tr[data-function="classify"] [data-field="state"]')
    see(state).to_have_attribute("data-state", re.compile("warm|asleep"))
    shot(page, "03-functions-warm")
    see(state).to_have_attribute("data-state", "asleep", timeout=30_000)
    see(page.locator('tr[data-function="classify"] [data-field="replicas"]')).to_have_text("0")
    shot(page, "04-functions-asleep")

    # a request wakes it (a cold start); the function page shows it in the charts, with the engine
    inputs, _ = example(models["mlp"])
    r = acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs))
    assert r.status_code == 200, r.text
    assert "x-paddlefn-cold-start-ms" in r.headers
    page.get_by_role("link", name="classify").click()
    see(page.get_by_role("heading", level=1)).to_have_text("classify")
    see(page.locator("#total-requests")).to_have_text("1", timeout=20_000)
    see(page.locator("#total-cold-starts")).to_have_text("1")
    see(page.locator("#fn-engine")).to_contain_text("paddle-inference on cpu")
    see(page.locator("#chart-requests rect")).to_have_count(1)
    see(page.locator("#chart-cold-starts rect")).to_have_count(1)
    see(page.locator("#chart-latency circle")).to_have_count(2)  # p50 and p99 of that minute
    see(page.locator("#chart-requests svg")).to_have_attribute(
        "aria-label", re.compile("1 requests and 0 errors")
    )
    shot(page, "05-function-page")

    # the copy-paste examples work as they are
    env = {**os.environ, "PADDLEFN_KEY": acme.key}
    curl = page.locator("#fn-curl").inner_text()
    assert f"{platform.url}/t/acme/v2/models/classify/infer" in curl
    if shutil.which("curl"):
        answer = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0 and json.loads(answer.stdout)["outputs"], answer.stdout + answer.stderr
    python = page.locator("#fn-python").inner_text()
    answer = subprocess.run(
        [sys.executable, "-c", python], env=env, capture_output=True, text=True, timeout=60
    )
    assert answer.returncode == 0, answer.stderr
    requests = 3 if shutil.which("curl") else 2
    see(page.locator("#total-requests")).to_have_text(str(requests), timeout=20_000)

    # usage and invoice show the same requests; the CSV downloads
    page.get_by_role("link", name="Usage and invoices").click()
    see(page.locator("#usage-requests")).to_have_text(str(requests))
    see(page.locator("#usage-cold-starts")).to_have_text("1")
    see(page.locator("#usage-table")).to_contain_text("classify")
    see(page.locator("#invoice-table")).to_contain_text("classify")
    see(page.locator("#chart-usage-requests rect")).to_have_count(1)
    shot(page, "06-usage")
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download invoice as CSV").click()
    download = download_info.value
    month = datetime.now(UTC).strftime("%Y-%m")
    assert download.suggested_filename == f"invoice-acme-{month}.csv"
    csv = Path(download.path()).read_text()
    assert f"acme,{month},classify,cpu,{requests}," in csv


def test_admin_sees_tenants_plans_capacity_and_warm_functions(platform, models, page):
    acme = make_tenant(platform, "acme")
    make_tenant(platform, "globex")
    deploy(acme, "classify", models["mlp"], {"idle_timeout_s": 120})
    see = expect()

    sign_in(page, platform.url, ADMIN_KEY)
    see(page.get_by_role("heading", level=1)).to_have_text("Platform")
    see(page.get_by_role("link", name="Admin")).to_have_attribute("aria-current", "page")
    see(page.locator("#tenants-table")).to_contain_text("acme")
    see(page.locator("#tenants-table")).to_contain_text("globex")
    see(page.locator("#plans-table")).to_contain_text("default")
    see(page.locator("#capacity-in_use")).to_have_text(re.compile(r"^[1-9]"))
    see(page.locator("#warm-table")).to_contain_text("acme/classify")
    see(page.locator("#capacity-warm")).to_have_text("1")
    shot(page, "07-admin")

    # the admin may look at any tenant's functions
    page.get_by_label("Tenant", exact=True).select_option("acme")
    page.get_by_role("link", name="Functions", exact=True).click()
    see(page.get_by_role("heading", level=1)).to_have_text("Functions of acme")
    see(page.locator('tr[data-function="classify"] [data-field="state"]')).to_have_attribute(
        "data-state", "warm"
    )
    page.get_by_label("Tenant", exact=True).select_option("globex")
    see(page.get_by_role("heading", level=1)).to_have_text("Functions of globex")

    # the stats endpoint is the tenant's own: another tenant's key finds nothing
    with platform.admin() as admin:
        globex_key = admin.post("/v1/tenants/globex/keys", json={}).json()["key"]
    with httpx.Client(base_url=platform.url, headers={"authorization": f"Bearer {globex_key}"}) as other:
        assert other.get("/v1/tenants/acme/functions/classify/stats").status_code == 404
    assert acme.http.get("/v1/tenants/acme/functions/nope/stats").status_code == 404
    too_long = acme.http.get("/v1/tenants/acme/functions/classify/stats", params={"minutes": 100_000})
    assert too_long.status_code == 400 and "minutes" in too_long.json()["error"]


def test_keyboard_alone_reaches_the_main_controls(platform, page, tmp_path):
    acme = make_tenant(platform, "acme")
    see = expect()
    page.goto(f"{platform.url}/ui/")
    see(page.get_by_role("status")).to_have_count(1)  # the aria-live region for announcements
    see(page.get_by_label("API key")).to_be_focused()
    page.keyboard.press("Shift+Tab")
    see(page.locator(":focus")).to_have_text("Skip to content")
    page.keyboard.press("Tab")
    page.keyboard.type("not-a-key")
    page.keyboard.press("Enter")
    see(page.get_by_role("alert").first).to_contain_text("not valid")
    see(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(acme.key)
    page.keyboard.press("Enter")
    heading = page.get_by_role("heading", level=1)
    see(heading).to_be_focused()  # focus moves to the new view's heading

    def tab_order(count: int, key: str = "Tab") -> list[str]:
        names = []
        for _ in range(count):
            page.keyboard.press(key)
            names.append(
                page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()")
            )
        return names

    assert tab_order(1) == ["Deploy a model"]
    heading.focus()
    assert tab_order(5, "Shift+Tab") == [
        "sign-out",
        "Usage and invoices",
        "Deploy",
        "Functions",
        "Skip to content",
    ]

    page.get_by_role("link", name="Deploy", exact=True).focus()
    page.keyboard.press("Enter")
    see(page.get_by_role("heading", level=1)).to_be_focused()
    assert tab_order(5) == ["fn-name", "fn-model", "fn-idle", "fn-device", "deploy-submit"]
    page.keyboard.press("Enter")  # submit without a name: the error says what to do, focus goes to the field
    see(page.locator("#deploy-error")).to_contain_text("Give the function a name")
    see(page.locator("#fn-name")).to_be_focused()
    page.keyboard.type("broken")
    not_a_model = tmp_path / "notes.tar.gz"
    with tarfile.open(not_a_model, "w:gz") as tar:
        readme = tmp_path / "README.txt"
        readme.write_text("no model here")
        tar.add(readme, arcname="README.txt")
    page.get_by_label("Model archive").set_input_files(str(not_a_model))
    page.get_by_role("button", name="Deploy").press("Enter")
    see(page.locator("#deploy-error")).to_contain_text("Model refused: no Paddle inference model found")
    see(page.locator('#deploy-stages li[data-stage="check"]')).to_have_attribute("data-state", "failed")
    shot(page, "08-keyboard-deploy-form")

    page.get_by_role("link", name="Usage and invoices").focus()
    page.keyboard.press("Enter")
    see(page.get_by_role("heading", level=1)).to_have_text("Usage and invoices of acme")
    assert "usage-month" in tab_order(6)
    see(page.get_by_role("button", name="Download invoice as CSV")).to_be_visible()

    page.get_by_role("button", name="Sign out").focus()
    page.keyboard.press("Enter")
    see(page.get_by_label("API key")).to_be_focused()


def test_the_portal_runs_under_a_policy_that_the_browser_enforces(platform, page, csp_violations):
    acme = make_tenant(platform, "acme")
    see = expect()
    response = page.goto(f"{platform.url}/ui/")
    assert response is not None
    policy = response.headers["content-security-policy"]
    assert (
        "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    )
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    sign_in(page, platform.url, acme.key)
    see(page.get_by_role("heading", level=1)).to_have_text("Functions of acme")
    assert not csp_violations  # the portal itself needs nothing the policy refuses

    # and the policy is in force: an injected inline script does not run, and the browser says why
    page.evaluate("""() => {
        const s = document.createElement("script");
        s.textContent = "window.injected = true";
        document.head.append(s);
    }""")
    assert page.evaluate("window.injected === undefined")
    for _ in range(50):  # the console report arrives as an event: let Playwright deliver it
        if any("script" in v for v in csp_violations):
            break
        page.wait_for_timeout(100)
    assert any("script" in v for v in csp_violations), csp_violations
    csp_violations.clear()
