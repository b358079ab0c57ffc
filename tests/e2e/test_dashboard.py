"""The command-center page in a real browser: headless Chromium (Debian's
``chromium`` package at /usr/bin/chromium, never a downloaded build) driven
by Playwright.

The page must show the orgs and numbers that were published, change them
live when more are published, refuse non-admin tokens on the page, show a
lost connection and recover from it.  The first test saves
``docs/dashboard.png`` (the README's screenshot): a hub whose store holds
half an hour of synthetic history, with the demo traffic running.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hub.aggregator.demo import make_orgs, run_demo
from tests.support.hubs import ROOT, HubProcess, stop_hub
from tests.support.mother import (
    StartHub,
    new_org,
    publish,
)
from tests.support.projections import caught_up

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"
#: Bound of every wait for the page, in milliseconds.
WAIT_MS = 15_000
DEMO_SEED = 3
DEMO_ORGS = 8


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium.  Fails, never skips, when it is missing."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's package (apt-get install -y chromium)"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Any]:
    """Chromium under Playwright (never a downloaded browser build)."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install playwright")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            await launched.close()


class Page:
    """A page of the dashboard, recording the script errors it raises."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on(
            "console",
            lambda message: self.errors.append(message.text) if message.type == "error" else None,
        )

    async def cell(self, org: str, column: str) -> str:
        text: str = await self.page.locator(
            f'#orgs tbody tr[data-org="{org}"] td[data-col="{column}"]'
        ).inner_text()
        return text

    async def wait_cell(self, org: str, column: str, expected: str) -> None:
        selector = f'#orgs tbody tr[data-org="{org}"] td[data-col="{column}"]'
        await self.page.wait_for_function(
            "([selector, expected]) => {"
            " const cell = document.querySelector(selector);"
            " return cell !== null && cell.textContent === expected; }",
            arg=[selector, expected],
            timeout=WAIT_MS,
        )

    async def wait_state(self, state: str, within: int = WAIT_MS) -> None:
        await self.page.wait_for_selector(f'#status[data-state="{state}"]', timeout=within)

    async def snapshots(self) -> int:
        value = await self.page.evaluate("Number(document.body.dataset.snapshots || 0)")
        return int(value)


async def open_page(browser: Any, hub: HubProcess, token: str) -> Page:
    context = await browser.new_context(viewport={"width": 1480, "height": 1200})
    page = Page(await context.new_page())
    await page.page.goto(f"{hub.http_url}/dashboard#token={token}", timeout=WAIT_MS)
    return page


async def seed_history(dsn: str, minutes: int = 30) -> int:
    """Half an hour of the demo orgs' traffic, written straight into the
    store as if it had happened: the hub reads it back when it starts."""
    orgs = make_orgs(DEMO_ORGS, 3, random.Random(DEMO_SEED))
    rng = random.Random(11)
    now = time.time()
    rows: list[tuple[str, int, str, str, float]] = []
    for org in orgs:
        seq = 0
        t = now - minutes * 60
        while True:
            t += rng.expovariate(org.rate_at(t))
            if t >= now - 1:
                break
            seq += 1
            type_ = rng.choices(org.types, org.weights)[0]
            payload = {"id": rng.randrange(10_000, 99_999), "by": rng.choice(org.members)}
            rows.append((org.name, seq, type_, json.dumps(payload), t))
    await write_history(dsn, rows)
    return len(rows)


async def test_dashboard_shows_live_numbers_and_saves_a_screenshot(
    fresh_dsn: str, mother_hub: StartHub, browser: Any
) -> None:
    seeded = await seed_history(fresh_dsn)
    hub = mother_hub({"HUB_DATABASE_URL": fresh_dsn})
    # Fixed names read well in the screenshot; the database is this test's own.
    a, b = "northwind", "contoso"
    await publish(hub, a, [("order.created", {"n": i}) for i in range(7)])
    await publish(hub, b, [("deploy", {})] * 3)

    page = await open_page(browser, hub, hub.admin_token())
    await page.wait_state("live")
    # The token left the address bar.
    assert "token" not in page.page.url
    await page.wait_cell(a, "1h", "7")
    await page.wait_cell(b, "1h", "3")
    assert await page.cell(a, "1m") == "7"
    # The history written before the hub started was read back.
    await page.page.wait_for_function(
        "(n) => document.querySelector('[data-kpi=\"events_1h\"]').textContent"
        " === n.toLocaleString('en-US')",
        arg=seeded + 10,
        timeout=WAIT_MS,
    )

    # Live: more events change the numbers without a reload.
    before = await page.snapshots()
    await publish(hub, a, [("order.paid", {"n": 1})] * 5)
    await page.wait_cell(a, "1h", "12")
    await page.wait_cell(a, "1m", "12")
    assert await page.snapshots() > before
    feed = page.page.locator("#feed li", has_text=a)
    await feed.first.wait_for(timeout=WAIT_MS)
    assert "order.paid" in await feed.first.inner_text()

    # Sorting by name puts the rows in order; by 1 h, the busiest first.
    await page.page.click('#orgs th[data-sort="org"]')
    names = await page.page.locator("#orgs tbody tr").evaluate_all(
        "rows => rows.map(row => row.dataset.org)"
    )
    assert names == sorted(names) and a in names
    await page.page.click('#orgs th[data-sort="1h"]')
    counts = await page.page.locator('#orgs tbody td[data-col="1h"]').all_inner_texts()
    values = [int(text.replace(",", "")) for text in counts]
    assert values == sorted(values, reverse=True)

    # The org's detail: its types and recent events.
    await page.page.click(f'#orgs tbody tr[data-org="{a}"]')
    detail = page.page.locator("#detail")
    await detail.wait_for(state="visible", timeout=WAIT_MS)
    assert await page.page.locator("#detail-org").inner_text() == a
    types = await page.page.locator("#detail-types li").all_inner_texts()
    assert any("order.created" in t and "7" in t for t in types), types
    assert any("order.paid" in t and "5" in t for t in types), types
    assert await page.page.locator("#detail-recent li").count() == 5
    await page.page.click("#detail-close")
    await detail.wait_for(state="hidden", timeout=WAIT_MS)

    # The demo drives members and more events; then the screenshot.
    demo = asyncio.create_task(
        run_demo(hub.http_url, hub.secret, orgs=DEMO_ORGS, seed=DEMO_SEED, duration=60)
    )
    try:
        await page.page.wait_for_function(
            "() => Number(document.querySelector('[data-kpi=\"clients\"]').textContent) >= 8",
            timeout=WAIT_MS,
        )
        await page.page.click('#orgs th[data-sort="5m"]')
        busiest = await page.page.locator("#orgs tbody tr").first.get_attribute("data-org")
        await page.page.click(f'#orgs tbody tr[data-org="{busiest}"]')
        await asyncio.sleep(6)
        nodes = await page.page.locator("#nodes tbody tr").all_inner_texts()
        assert len(nodes) == 1 and "healthy" in nodes[0], nodes
        await page.page.evaluate("window.scrollTo(0, 0)")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        await page.page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        demo.cancel()
        await asyncio.gather(demo, return_exceptions=True)
    assert SCREENSHOT.stat().st_size > 10_000
    assert page.errors == []


async def test_dashboard_refuses_tokens_that_are_not_an_admins(
    mother_hub: StartHub, browser: Any
) -> None:
    hub = mother_hub()
    member = hub.token(sub="member", orgs=[new_org()])
    page = await open_page(browser, hub, member)
    error = page.page.locator("#login-error")
    await error.wait_for(state="visible", timeout=WAIT_MS)
    assert "not belong to a network admin" in await error.inner_text()
    assert "403" in await error.inner_text()
    assert await page.page.locator("#main").is_hidden()
    await page.wait_state("error")

    # A bad token typed into the form: refused too (401).
    await page.page.fill("#token-input", "not-a-token")
    await page.page.click("#login-form button[type=submit]")
    await page.page.wait_for_function(
        "() => document.querySelector('#login-error').textContent.includes('401')",
        timeout=WAIT_MS,
    )
    assert "refused this token" in await error.inner_text()

    # An admin's token typed in: the page connects.
    await page.page.fill("#token-input", hub.admin_token())
    await page.page.click("#login-form button[type=submit]")
    await page.wait_state("live")
    assert await page.page.locator("#login").is_hidden()


async def test_dashboard_shows_a_lost_connection_and_recovers(
    mother_hub: StartHub, browser: Any
) -> None:
    hub = mother_hub()
    org = new_org()
    await publish(hub, org, [("before", {})] * 2)
    page = await open_page(browser, hub, hub.admin_token())
    await page.wait_state("live")
    await page.wait_cell(org, "1h", "2")

    stop_hub(hub)
    await page.wait_state("lost")
    banner = page.page.locator("#banner")
    await banner.wait_for(state="visible", timeout=WAIT_MS)
    assert "Reconnecting" in await banner.inner_text()
    # The last numbers stay on the page meanwhile.
    assert await page.cell(org, "1h") == "2"

    again = mother_hub(secret=hub.secret, port=hub.port)
    await page.wait_state("live", within=30_000)
    await banner.wait_for(state="hidden", timeout=WAIT_MS)
    # An in-memory hub starts empty: the org is gone until it publishes again.
    await publish(again, org, [("after", {})] * 3)
    await page.wait_cell(org, "1h", "3")
    assert page.errors == [] or all("WebSocket" in e or "Failed to load" in e for e in page.errors)


async def write_history(dsn: str, rows: list[tuple[str, int, str, str, float]]) -> None:
    """Events ``(org, seq, type, payload JSON, created_at)`` written straight
    into the store, as if they had happened then."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO hub.events (org, seq, type, payload, created_at) "
                "VALUES ($1, $2, $3, $4::jsonb, to_timestamp($5))",
                rows,
            )
            await conn.execute(
                "INSERT INTO hub.org_seq (org, seq) "
                "SELECT org, max(seq) FROM hub.events GROUP BY org"
            )
    finally:
        await conn.close()


async def seed_week(dsn: str) -> None:
    """A week of history for three orgs, written as if it had happened."""
    rng = random.Random(5)
    now = time.time()
    rows: list[tuple[str, int, str, str, float]] = []
    for org, per_day in (("fabrikam", 30), ("tailspin", 12), ("litware", 4)):
        times = sorted(now - rng.uniform(3600, 6.5 * 86400) for _ in range(per_day * 6))
        for seq, at in enumerate(times, start=1):
            payload = {"user_id": f"{org}-u{rng.randrange(5)}"}
            rows.append(
                (org, seq, rng.choice(["ticket.opened", "deploy"]), json.dumps(payload), at)
            )
    await write_history(dsn, rows)


async def test_dashboard_seven_day_history_and_its_csv_match_the_sql_views(
    fresh_dsn: str, mother_hub: StartHub, browser: Any, tmp_path: Path
) -> None:
    await seed_week(fresh_dsn)
    hub = mother_hub({"HUB_DATABASE_URL": fresh_dsn})
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await caught_up(conn, "mother", within=WAIT_MS / 1000)
        expected = {
            r["org"]: int(r["events"])
            for r in await conn.fetch(
                "SELECT org, sum(events) AS events FROM mother.org_activity_hourly "
                "WHERE hour >= now() - interval '7 days' GROUP BY org"
            )
        }
        users = {
            r["org"]: int(r["users"])
            for r in await conn.fetch(
                "SELECT org, count(DISTINCT user_id) AS users FROM mother.hour_users "
                "WHERE hour >= now() - interval '7 days' GROUP BY org"
            )
        }
    finally:
        await conn.close()
    assert expected == {"fabrikam": 180, "tailspin": 72, "litware": 24}

    page = await open_page(browser, hub, hub.admin_token())
    await page.wait_state("live")
    await page.page.click('[data-history="7d"]')
    await page.page.wait_for_function(
        "() => document.body.dataset.history === '7d'", timeout=WAIT_MS
    )
    rows = await page.page.locator("#history-orgs tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.org,"
        " r.querySelector('[data-col=events]').textContent,"
        " r.querySelector('[data-col=users]').textContent])"
    )
    assert rows == [[org, str(n), str(users[org])] for org, n in expected.items()]
    summary = (await page.page.locator("#history-summary").inner_text()).lower()
    assert "276 events" in summary and "per 1 h" in summary and "from the rollups" in summary
    # The week's chart has a bar per hour that held events.
    bars = await page.page.locator("#history-chart path.bars").get_attribute("d")
    assert bars is not None and bars.count("M") > 24

    # The projections: the mother's rollups, caught up.
    mother_row = page.page.locator('#projections-table tbody tr[data-projection="mother"]')
    await mother_row.wait_for(timeout=WAIT_MS)
    assert await mother_row.locator('td[data-col="stopped"]').inner_text() == "0"

    # One org's own history.
    await page.page.click('#history-orgs tbody tr[data-org="tailspin"]')
    await page.page.locator("#history-org").wait_for(state="visible", timeout=WAIT_MS)
    assert await page.page.locator("#history-org-name").inner_text() == "tailspin"

    # The CSV export is the table, as the SQL views give it.
    await page.page.click("#history-org-close")
    async with page.page.expect_download(timeout=WAIT_MS) as info:
        await page.page.click("#history-csv")
    download = await info.value
    path = tmp_path / "history.csv"
    await download.save_as(str(path))
    lines = path.read_text().splitlines()
    assert lines[0] == "org,events,users,last_event_at"
    assert [line.split(",")[:3] for line in lines[1:]] == [
        [org, str(n), str(users[org])] for org, n in expected.items()
    ]
    assert page.errors == []
