"""The admin dashboard in a real browser (Debian's chromium through chromium-driver and
Selenium) against a real ``serve`` with local workers.

Sign-in (a wrong token and a tenant token refused), the overview's pool counts, why a
pending lease waits, a pool's page and resize, revoking a lease, creating a tenant (its
token shown once) and disabling it, destroying a worker, the audit log, sign-out; a
forged POST without the session's CSRF token is refused (plain HTTP, as a forging site
would send it).
Screenshots of each page go to the session's pytest output directory
(``<basetemp>/screenshots``), or to ``$WORKERLEASE_SCREENSHOTS`` when set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.server import ServerProcess, pool, wait_until

pytestmark = pytest.mark.integration

POOL = "hosted-ubuntu"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("dashboard")
    process = ServerProcess(
        directory,
        pools=[
            pool(min_ready=2, max_workers=4),
            pool("hosted-windows", os="windows", min_ready=1, max_workers=2),
        ],
    )
    try:
        process.start()
        process.wait_ready_workers(2)
        process.wait_ready_workers(1, pool="hosted-windows")
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("WORKERLEASE_SCREENSHOTS")
    path = Path(configured) if configured else tmp_path_factory.getbasetemp() / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(screenshots: Path) -> Iterator[Any]:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("chromium/chromedriver missing: run .ci/ensure-chromium", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1440,900",
        "--disable-gpu",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.screenshots = screenshots  # where shot() saves
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str) -> Path:
    path: Path = driver.screenshots / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot {path}"
    return path


def wait_for(driver: Any, css: str, timeout: float = 30) -> Any:
    return WebDriverWait(driver, timeout).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def submit_confirmed(driver: Any, button_css: str) -> None:
    """Click an action's button and accept its confirmation dialog."""
    driver.find_element(By.CSS_SELECTOR, button_css).click()
    WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
    driver.switch_to.alert.accept()


def sign_in(driver: Any, server: ServerProcess, token: str) -> None:
    driver.get(f"{server.url}/admin/login")
    field = wait_for(driver, "#token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#sign-in").click()


def flash(driver: Any) -> str:
    return str(wait_for(driver, ".flash").text)


def test_only_the_admin_token_signs_in(browser: Any, server: ServerProcess) -> None:
    browser.delete_all_cookies()
    browser.get(f"{server.url}/admin/")
    assert browser.current_url.endswith("/admin/login")  # signed out: sent to sign-in
    sign_in(browser, server, "not-the-admin-token-at-all")
    assert "not the admin token" in flash(browser)
    shot(browser, "login-refused")
    tenant = server.create_tenant("sneaky")["token"]
    sign_in(browser, server, tenant)
    assert "not the admin token" in flash(browser)
    assert "token" not in browser.current_url.split("/admin/")[1]  # never in a URL

    sign_in(browser, server, server.admin_token or "")
    wait_for(browser, "table#pools")
    cookie = browser.get_cookie("workerlease_admin")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/admin/"
    assert server.admin_token not in str(browser.get_cookies())


def test_overview_shows_every_pool_with_its_counts(browser: Any, server: ServerProcess) -> None:
    browser.get(f"{server.url}/admin/")
    wait_for(browser, "table#pools")
    for name in (POOL, "hosted-windows"):
        counts = server.pool_counts(name)
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-pool="{name}"]')
        ready = row.find_element(By.CSS_SELECTOR, 'td[data-state="ready"]').text
        assert int(ready) == counts["ready"] >= 1
        assert "ok" in row.text
    shot(browser, "overview")


def test_a_pending_lease_page_says_why_it_waits(browser: Any, server: ServerProcess) -> None:
    """hosted-windows holds at most 2 workers: a third tenant's lease waits for one."""
    leases = []
    for name in ("w1", "w2", "w3"):
        token = server.create_tenant(name)["token"]
        body = {"pool": "hosted-windows", "wait_seconds": 60 if name != "w3" else 0}
        leases.append(
            (token, server.request("POST", "/v1/leases", token=token, json=body, timeout=90).json())
        )
    assert [lease["state"] for _, lease in leases] == ["active", "active", "pending"]
    token, pending = leases[2]
    assert pending["waiting_reason"]["kind"] == "pool_at_max_workers"
    try:
        browser.get(f"{server.url}/admin/leases/{pending['id']}")
        reason = wait_for(browser, "#waiting-reason")
        assert reason.get_attribute("data-kind") == "pool_at_max_workers"
        assert "max_workers (2)" in reason.text
        shot(browser, "lease-waiting")
    finally:
        for token, lease in leases:
            server.request("DELETE", f"/v1/leases/{lease['id']}", token=token)
        # Leave the pool as the later tests expect it: warm, nothing coming or going.
        wait_until(
            lambda: {w["state"] for w in server.workers("live", "hosted-windows")} == {"ready"},
            90,
            message=lambda: (
                f"hosted-windows never settled: {server.workers('live', 'hosted-windows')}"
            ),
        )


def test_revoke_a_lease_from_its_page(browser: Any, server: ServerProcess) -> None:
    token = server.create_tenant("acme")["token"]
    lease = server.request("POST", "/v1/leases", token=token, json={"pool": POOL}).json()
    assert lease["state"] == "active"
    browser.get(f"{server.url}/admin/leases")
    wait_for(browser, f'tr[data-lease="{lease["id"]}"]')
    shot(browser, "leases")
    browser.find_element(By.LINK_TEXT, lease["id"]).click()
    wait_for(browser, "#timeline")
    submit_confirmed(browser, "#revoke")
    assert "revoked" in flash(browser)
    shot(browser, "lease")
    got = server.request("GET", f"/v1/leases/{lease['id']}", token=token).json()
    assert got["state"] == "revoked"
    timeline = browser.find_element(By.CSS_SELECTOR, "#timeline").text
    assert "revoked by operator (dashboard)" in timeline
    assert "requested" in timeline or "pending" in timeline or "active" in timeline


def test_cancel_a_running_task_from_its_lease_page(browser: Any, server: ServerProcess) -> None:
    token = server.create_tenant("tasker")["token"]
    lease = server.request(
        "POST", "/v1/leases", token=token, json={"pool": POOL, "wait_seconds": 60}, timeout=90
    ).json()
    assert lease["state"] == "active", lease
    tasks = f"/v1/leases/{lease['id']}/tasks"
    task = server.request("POST", tasks, token=token, json={"script": "sleep 300"}).json()
    wait_until(
        lambda: (
            server.request("GET", f"{tasks}/{task['id']}", token=token).json()["state"] == "running"
        ),
        60,
        message="the task never started",
    )
    browser.get(f"{server.url}/admin/leases/{lease['id']}")
    wait_for(browser, f'tr[data-task="{task["id"]}"]')
    submit_confirmed(browser, f"#cancel-{task['id']}")
    assert "cancel requested" in flash(browser)
    shot(browser, "lease-with-task")
    ended: dict[str, Any] = {}

    def cancelled() -> bool:
        ended.update(server.request("GET", f"{tasks}/{task['id']}", token=token).json())
        return ended["state"] == "cancelled"

    wait_until(cancelled, 60, message=lambda: f"the task was not cancelled: {ended}")
    assert ended["error"] == "cancelled by an operator"


def test_create_a_tenant_token_once_then_disable_it(browser: Any, server: ServerProcess) -> None:
    browser.get(f"{server.url}/admin/tenants")
    wait_for(browser, "#tenant-name").send_keys("globex")
    browser.find_element(By.CSS_SELECTOR, "#create-tenant").click()
    token = wait_for(browser, "#new-token").get_attribute("value")
    assert token.startswith("wlt_")
    shot(browser, "tenant-created")
    assert server.request("GET", "/v1/pools", token=token).status_code == 200
    assert token not in browser.current_url

    browser.get(f"{server.url}/admin/tenants")  # shown once: not on the page again
    wait_for(browser, "table#tenants")
    assert token not in browser.page_source
    row = browser.find_element(By.XPATH, "//tr[td[normalize-space()='globex']]")
    tenant_id = row.get_attribute("data-tenant")
    submit_confirmed(browser, f'tr[data-tenant="{tenant_id}"] button')
    assert "disabled" in flash(browser)
    shot(browser, "tenants")
    assert server.request("GET", "/v1/pools", token=token).status_code == 401


def test_pool_page_resizes_and_destroys_a_worker(browser: Any, server: ServerProcess) -> None:
    browser.get(f"{server.url}/admin/pools/hosted-windows")
    wait_for(browser, "table#workers")
    field = browser.find_element(By.CSS_SELECTOR, "#max-workers")
    field.clear()
    field.send_keys("3")
    submit_confirmed(browser, "#resize")
    assert "updated" in flash(browser)
    pools = server.admin("GET", "/v1/admin/pools").json()["pools"]
    assert next(p for p in pools if p["name"] == "hosted-windows")["max_workers"] == 3

    worker_id = wait_for(browser, "tr[data-worker]").get_attribute("data-worker")
    submit_confirmed(browser, f'tr[data-worker="{worker_id}"] button')
    assert "being destroyed" in flash(browser)
    shot(browser, "pool")
    wait_until(
        lambda: worker_id not in {w["id"] for w in server.workers("live", "hosted-windows")},
        60,
        message=f"worker {worker_id} never left",
    )
    events = server.admin("GET", "/v1/admin/events", params={"limit": 200}).json()["events"]
    assert any(e["subject_id"] == worker_id and "by operator" in e["reason"] for e in events)


def test_events_page_filters_the_audit_log(browser: Any, server: ServerProcess) -> None:
    browser.get(f"{server.url}/admin/events?kind=pool")
    rows = wait_for(browser, "table#events").find_elements(By.CSS_SELECTOR, "tbody tr")
    assert rows and all("pool" in r.text for r in rows)
    shot(browser, "events")
    browser.get(f"{server.url}/admin/")  # after the actions: leased, destroying, resized
    wait_for(browser, "table#pools")
    shot(browser, "overview-after-actions")


def test_a_forged_post_without_the_csrf_token_is_refused(server: ServerProcess) -> None:
    """A signed-in session's cookie without its CSRF token (what another site's form
    would send, were SameSite not there) changes nothing."""
    http = requests.Session()
    page = http.get(f"{server.url}/admin/login", timeout=30)
    csrf = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    signed = http.post(
        f"{server.url}/admin/login",
        data={"token": server.admin_token, "csrf_token": csrf},
        allow_redirects=False,
        timeout=30,
    )
    assert signed.status_code == 302
    before = len(server.admin("GET", "/v1/admin/tenants").json()["tenants"])
    for data in ({"name": "forged"}, {"name": "forged", "csrf_token": "guessed"}):
        forged = http.post(f"{server.url}/admin/tenants", data=data, timeout=30)
        assert forged.status_code == 400 and "CSRF" in forged.text
    assert len(server.admin("GET", "/v1/admin/tenants").json()["tenants"]) == before


def test_sign_out_ends_the_session(browser: Any, server: ServerProcess) -> None:
    browser.get(f"{server.url}/admin/")
    wait_for(browser, "#sign-out").click()
    assert "Signed out" in flash(browser)
    browser.get(f"{server.url}/admin/tenants")
    assert browser.current_url.endswith("/admin/login")
