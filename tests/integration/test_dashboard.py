"""The web dashboard (broker/http/static) driven in a real headless Chromium.

A broker runs with ``--http-port 0``; the page is opened from it and the test acts through
the Python client, then checks what the page shows: queue depth going from 0 to N, the
overview's rate chart picking up the publishes, a dead-letter queue's messages with their
x-death reason and source queue, the redrive button moving them back, and the close
button of a connection. Screenshots are saved and checked to be real PNGs.

Needs Debian's ``chromium`` (/usr/bin/chromium, or $CHROMIUM) and the ``playwright`` Python
package (its own browser downloads are not used); skipped with the reason if either is
missing. Every wait is bounded. Set DASHBOARD_SCREENSHOTS=DIR to keep the screenshots.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from conveyor.broker.auth import key_path, load_or_create_key, new_claims, sign_token
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, queue_info, take, wait_until

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

try:
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(
        async_playwright is None,
        reason="the playwright Python package is not installed (pip install -e '.[test]')",
    ),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set $CHROMIUM)",
    ),
    pytest.mark.timeout(120),
]

WAIT_MS = int(WAIT * 1000)
MIN_PNG_BYTES = 10_000  # a 1280-wide page with tables and a chart is far larger


@asynccontextmanager
async def browser_page(base_url: str, width: int = 1280) -> AsyncIterator[tuple[Page, list[str]]]:
    """A fresh headless Chromium page; yields it and the list of page errors seen.

    Every request the page makes must go to the broker (no CDN: it may be offline)."""
    assert async_playwright is not None
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"], timeout=30_000
        )
        try:
            context = await browser.new_context(viewport={"width": width, "height": 900})
            context.set_default_timeout(WAIT_MS)
            page = await context.new_page()
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda m: (
                    errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
                ),
            )

            def check_request(req: Any) -> None:
                if not req.url.startswith((base_url, "data:")):
                    errors.append(f"request outside the broker: {req.url}")

            page.on("request", check_request)
            yield page, errors
        finally:
            await browser.close()


async def wait_js(page: Page, what: str, expr: str, arg: Any = None, timeout: float = WAIT) -> Any:
    """Wait (bounded) until ``expr`` is truthy in the page; fail saying ``what``."""
    try:
        handle = await page.wait_for_function(expr, arg=arg, timeout=timeout * 1000, polling=100)
        return await handle.json_value()
    except PlaywrightError as exc:
        text = await page.inner_text("body")
        raise AssertionError(
            f"dashboard did not show {what} within {timeout}s: "
            f"{exc.message.splitlines()[0]}\n--- page ---\n{text[:3000]}"
        ) from None


CELL = """([queue, cls, want]) => {
  const td = document.querySelector(`#queue-table tr[data-queue="${CSS.escape(queue)}"] td.${cls}`);
  return td !== null && td.textContent === want;
}"""


async def wait_cell(page: Page, queue: str, cls: str, want: str) -> None:
    await wait_js(page, f"{cls} = {want} for queue {queue!r}", CELL, [queue, cls, want])


async def cell(page: Page, queue: str, cls: str) -> str:
    return await page.inner_text(f'#queue-table tr[data-queue="{queue}"] td.{cls}')


def check_png(path: Path, want_width: int = 1280) -> int:
    """The file is a PNG of the viewport's width and not trivially small; its size."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width == want_width and height >= 600, (path, width, height)
    assert len(data) > MIN_PNG_BYTES, f"{path}: only {len(data)} bytes"
    return len(data)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    d = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


async def shoot(page: Page, shots: Path, name: str, taken: list[Path]) -> None:
    path = shots / f"dashboard-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    taken.append(path)


async def test_dashboard_live_queues_dlq_redrive_and_connections(
    broker_factory: Any, shots: Path
) -> None:
    b: BrokerProcess = broker_factory("--http-port", "0")
    assert b.http_port, "broker printed no 'conveyor http listening' line"
    base = f"http://127.0.0.1:{b.http_port}/"
    conn = await connect(b.url)
    taken: list[Path] = []
    try:
        async with browser_page(base) as (page, errors):
            await page.goto(base, wait_until="load")
            assert await page.title() == "Conveyor dashboard"
            await wait_js(
                page, "the live status", "document.querySelector('#status').dataset.state === 'ok'"
            )

            # --- queue depth 0 -> N, with the rate chart and counters following.
            n = 60
            await conn.declare_queue("dash.orders")
            await wait_cell(page, "dash.orders", "ready", "0")
            chart_before = await page.eval_on_selector("#rate-chart", "c => c.toDataURL()")
            samples_before = int(
                await page.eval_on_selector("#rate-chart", "c => c.dataset.samples")
            )
            # Spread over ~3 s so the broker's 1 s rate samples (and the page's 1 s polls)
            # see a non-zero publish rate.
            for i in range(6):
                for j in range(n // 6):
                    await conn.publish("", "dash.orders", f"order {i}-{j}".encode())
                await asyncio.sleep(0.5)
            await wait_cell(page, "dash.orders", "ready", str(n))
            await wait_js(
                page,
                "a publish rate in the chart",
                "Number(document.querySelector('#rate-chart').dataset.maxRate) > 0",
            )
            await wait_js(
                page,
                f"{n} ready in the overview",
                "n => Number(document.querySelector('#ov-ready').textContent"
                ".replace(/,/g, '')) >= n",
                n,
            )
            assert await cell(page, "dash.orders", "unacked") == "0"
            assert await cell(page, "dash.orders", "consumers") == "0"
            samples_after = int(
                await page.eval_on_selector("#rate-chart", "c => c.dataset.samples")
            )
            assert samples_after > samples_before  # polled every second
            chart_after = await page.eval_on_selector("#rate-chart", "c => c.toDataURL()")
            assert chart_after != chart_before  # the lines were redrawn with the new rates
            assert await page.inner_text("#ov-queues") == "1"
            await shoot(page, shots, "overview", taken)

            # --- a dead-letter queue: three rejected messages, inspected, then redriven.
            await conn.declare_exchange("dash.dlx", "fanout")
            await conn.declare_queue("dash.dlq")
            await conn.bind("dash.dlx", "dash.dlq")
            await conn.declare_queue("dash.work", dead_letter_exchange="dash.dlx")
            for i in range(3):
                await conn.publish("", "dash.work", f"job {i}".encode())
            consumer = await conn.consume("dash.work", prefetch=3)
            for msg in await take(consumer, 3):
                msg.reject(requeue=False)
            await asyncio.wait_for(consumer.cancel(), WAIT)
            await wait_cell(page, "dash.dlq", "ready", "3")
            await wait_cell(page, "dash.work", "ready", "0")
            # Marked as a DLQ (bound to dash.work's dead-letter exchange).
            await wait_js(
                page,
                "the DLQ marker",
                "document.querySelector("
                "'#queue-table tr[data-queue=\"dash.dlq\"]').classList.contains('dlq')",
            )
            assert await cell(page, "dash.work", "dlx") == "dash.dlx"

            await page.click('#nav a[data-page="queues"]')
            await page.click('#queue-table tr[data-queue="dash.dlq"] button.inspect')
            await wait_js(
                page,
                "3 peeked messages",
                "document.querySelectorAll('#peek-table tbody tr').length === 3",
            )
            rows = await page.eval_on_selector_all(
                "#peek-table tbody tr",
                """rows =>
                rows.map(r => ({body: r.querySelector('.body').textContent,
                                reason: r.querySelector('.death-reason').textContent,
                                queue: r.querySelector('.death-queue').textContent}))""",
            )
            assert rows == [
                {"body": f"job {i}", "reason": "rejected", "queue": "dash.work"} for i in range(3)
            ]
            assert await page.inner_text("#inspect-queue") == "dash.dlq"
            await shoot(page, shots, "dlq", taken)

            await page.click("#redrive")
            await wait_js(
                page,
                "the redrive result",
                "document.querySelector('#inspect-result').textContent"
                ".startsWith('moved 3 message')",
            )
            await wait_cell(page, "dash.dlq", "ready", "0")
            await wait_cell(page, "dash.work", "ready", "3")
            await wait_js(
                page,
                "the emptied DLQ",
                "document.querySelectorAll('#peek-table tbody tr').length === 0",
            )
            info = await queue_info(conn, "dash.work")
            assert info is not None and info["messages"] == 3
            await shoot(page, shots, "redriven", taken)

            # --- connections: a second client appears, and its close button closes it.
            await page.click('#nav a[data-page="connections"]')
            ids = await page.eval_on_selector_all(
                "#connection-table tbody tr", "rows => rows.map(r => r.dataset.connection)"
            )
            assert len(ids) == 1
            other = await connect(b.url, reconnect=False, name="dash-worker")
            try:
                new_id = await wait_js(
                    page,
                    "the second connection",
                    """known => {
                    const rows = [...document.querySelectorAll('#connection-table tbody tr')];
                    const fresh = rows.map(r => r.dataset.connection)
                                      .filter(id => !known.includes(id));
                    return fresh.length === 1 ? fresh[0] : null;
                }""",
                    ids,
                )
                await wait_js(
                    page,
                    "the second connection's name",
                    """id =>
                    document.querySelector(`#connection-table tr[data-connection="${id}"] .name`)
                      .textContent === "dash-worker" """,
                    new_id,
                )
                close = page.locator(
                    f'#connection-table tr[data-connection="{new_id}"] button.close'
                )
                await close.click()
                assert await close.inner_text() == "Sure?"  # asks before closing
                await close.click()
                await wait_until(lambda: not other.is_open, WAIT)
                await wait_js(
                    page,
                    "the closed connection gone",
                    """id =>
                    document.querySelector(`#connection-table tr[data-connection="${id}"]`)
                      === null""",
                    new_id,
                )
            finally:
                await asyncio.wait_for(other.close(), WAIT)
            assert conn.is_open
            assert (
                await page.eval_on_selector_all(
                    "#connection-table tbody tr", "rows => rows.map(r => r.dataset.connection)"
                )
                == ids
            )
            await shoot(page, shots, "connections", taken)
            assert errors == []
    finally:
        await asyncio.wait_for(conn.close(), WAIT)

    sizes = {p.name: check_png(p) for p in taken}
    assert len(sizes) == 4
    print("dashboard screenshots:", {str(p): p.stat().st_size for p in taken})


async def test_dashboard_token_field_when_the_broker_requires_auth(
    broker_factory: Any, shots: Path
) -> None:
    b: BrokerProcess = broker_factory("--http-port", "0", "--require-auth")
    base = f"http://127.0.0.1:{b.http_port}/"
    token = sign_token(
        load_or_create_key(key_path(b.data_dir)),
        new_claims("ops", 600, configure=["*"], write=["*"], read=["*"]),
    )
    conn = await connect(b.url, token=token)
    try:
        await conn.declare_queue("dash.secret")
        await conn.publish("", "dash.secret", b"x")
        async with browser_page(base) as (page, errors):
            await page.goto(base, wait_until="load")
            # Refused without a token: the page says so and offers the field.
            await wait_js(
                page,
                "the token prompt",
                "document.querySelector('#status').dataset.state === 'auth'",
            )
            assert await page.is_visible("#token")
            assert await page.locator("#queue-table tbody tr").count() == 0
            await page.fill("#token", token)
            await page.click("#token-save")
            await wait_cell(page, "dash.secret", "ready", "1")
            await wait_js(
                page, "the live status", "document.querySelector('#status').dataset.state === 'ok'"
            )
            stored = await page.evaluate("sessionStorage.getItem('conveyor.token')")
            assert stored == token
            assert await page.input_value("#token") == ""  # not left in the field
            # A reload in the same tab keeps working from sessionStorage.
            await page.reload(wait_until="load")
            await wait_cell(page, "dash.secret", "ready", "1")
            path = shots / "dashboard-auth.png"
            await page.screenshot(path=str(path), full_page=True)
            # Errors logged by the browser are only the expected 401s before the token.
            assert all("401" in e for e in errors), errors
        check_png(path)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


# Every page, and what must be visible on it once it has loaded.
PAGES = [
    ("overview", ["#rate-chart", "#ov-queues"]),
    ("queues", ['#queue-table tr[data-queue="dash.q"] button.delete', "#queue-form"]),
    (
        "queue/dash.q",
        [
            "#depth-chart",
            "#qrate-chart",
            "#qp-args tr.argument",
            "#qp-consumer-table tbody tr",
            "#publish-form",
            "#get-form",
            "#peek-table tbody tr",
            "#qp-actions button.purge",
        ],
    ),
    (
        "exchanges",
        [
            '#exchange-table tr[data-exchange="dash.x"]',
            "#binding-table tbody tr",
            "#exchange-form",
            "#binding-form",
        ],
    ),
    ("consumers", ["#consumer-table tbody tr"]),
    ("connections", ["#connection-table button.close"]),
    ("streams", ['#stream-table tr[data-group="g1"] .lag']),
    ("access", ["#ac-subject", "#access-table"]),
]

# The page is no wider than the window, and every listed element is shown and within it.
FITS = """sels => {
  const out = [];
  if (document.documentElement.scrollWidth > window.innerWidth)
    out.push(`page is ${document.documentElement.scrollWidth}px wide in ${window.innerWidth}px`);
  for (const sel of sels) {
    const e = document.querySelector(sel);
    if (e === null) { out.push(`${sel}: missing`); continue; }
    const r = e.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) out.push(`${sel}: not visible`);
    if (r.right > window.innerWidth + 0.5) out.push(`${sel}: right edge ${r.right}px`);
  }
  return out;
}"""


async def seed_everything(conn: Any) -> None:
    await conn.declare_exchange("dash.x", "topic")
    await conn.declare_queue("dash.q", max_length=1000, message_ttl_ms=600000)
    await conn.bind("dash.x", "dash.q", "orders.#")
    for i in range(5):
        await conn.publish(
            "dash.x",
            f"orders.{i}",
            f"order {i}".encode(),
            headers={"tenant": "acme"},
            content_type="text/plain",
        )
    await conn.declare_queue("dash.s", queue_type="stream")
    for i in range(4):
        await conn.publish("", "dash.s", f"s{i}".encode())
    async with conn.stream("dash.s", group="g1", offset="first", auto_commit=False) as st:
        msg = await st.get(WAIT)
        assert msg is not None
        msg.ack()


async def test_dashboard_every_page_at_1400_and_800(broker_factory: Any, shots: Path) -> None:
    """Each page at 1400 and 800 px: no sideways scrolling, key elements visible, the
    queue's depth chart drawn from the broker's history at load; then the forms and
    buttons: create/delete exchanges and bindings, publish, get, purge, delete."""
    b: BrokerProcess = broker_factory("--http-port", "0")
    base = f"http://127.0.0.1:{b.http_port}/"
    conn = await connect(b.url, name="dash-app")
    holder = await connect(b.url, name="dash-holder")
    taken: list[tuple[Path, int]] = []
    try:
        await seed_everything(conn)
        held = await holder.consume("dash.q", prefetch=1)  # one unacked, one consumer
        await take(held, 1)
        status_ok = "document.querySelector('#status').dataset.state === 'ok'"
        for width in (1400, 800):
            async with browser_page(base, width) as (page, errors):
                for name, sels in PAGES:
                    await page.goto(f"{base}#/{name}", wait_until="load")
                    await wait_js(page, "the live status", status_ok)
                    await wait_js(
                        page,
                        f"page {name} loaded",
                        "sels => sels.every(s => document.querySelector(s) !== null)",
                        sels,
                    )
                    if name == "queue/dash.q":
                        # From /history at once: the ring's first row and now.
                        await wait_js(
                            page,
                            "depth points at load",
                            "Number(document.querySelector('#depth-chart').dataset.samples) >= 2",
                        )
                    problems = await page.evaluate(FITS, sels)
                    assert problems == [], (width, name, problems)
                    path = shots / f"dashboard-{width}-{name.replace('/', '-')}.png"
                    await page.screenshot(path=str(path), full_page=True)
                    taken.append((path, width))
                assert errors == [], errors
        assert await page_texts(base) == {
            "subject": "anonymous",
            "lag": "3",
            "headers": True,
            "arguments": True,
        }
        await forms_and_buttons(b, base, conn)
    finally:
        await asyncio.wait_for(holder.close(), WAIT)
        await asyncio.wait_for(conn.close(), WAIT)
    assert len(taken) == 2 * len(PAGES)
    for path, width in taken:
        check_png(path, width)


async def page_texts(base: str) -> dict[str, Any]:
    """What the access, streams and queue pages say."""
    async with browser_page(base, 1400) as (page, errors):
        await page.goto(f"{base}#/access", wait_until="load")
        await wait_js(
            page, "whoami", "document.querySelector('#ac-subject').textContent !== '\u2013'"
        )
        subject = await page.inner_text("#ac-subject")
        await page.goto(f"{base}#/streams", wait_until="load")
        await wait_js(
            page,
            "the stream group",
            "document.querySelector('#stream-table tr[data-group=\"g1\"] .lag') !== null",
        )
        lag = await page.inner_text('#stream-table tr[data-group="g1"] .lag')
        await page.goto(f"{base}#/queue/dash.q", wait_until="load")
        await wait_js(
            page, "peeked messages", "document.querySelectorAll('#peek-table tbody tr').length >= 4"
        )
        props = await page.inner_text("#peek-table tbody tr:first-child td.props")
        args = await page.inner_text("#qp-args")
        assert errors == [], errors
    return {
        "subject": subject,
        "lag": lag,
        "headers": 'header tenant="acme"' in props and 'content_type="text/plain"' in props,
        "arguments": "max_length" in args and "1000" in args,
    }


async def forms_and_buttons(b: BrokerProcess, base: str, conn: Any) -> None:
    async with browser_page(base, 800) as (page, errors):
        # Exchanges and bindings: create, see, unbind, delete (each delete asks first).
        await page.goto(f"{base}#/exchanges", wait_until="load")
        await page.fill("#xf-name", "dash.new")
        await page.select_option("#xf-type", "fanout")
        await page.click("#xf-create")
        await wait_js(
            page,
            "the new exchange",
            "document.querySelector("
            "'#exchange-table tr[data-exchange=\"dash.new\"] .type')?.textContent"
            " === 'fanout'",
        )
        await page.fill("#bf-exchange", "dash.new")
        await page.fill("#bf-queue", "dash.q")
        await page.click("#bf-create")
        row = '#binding-table tr[data-exchange="dash.new"][data-queue="dash.q"]'
        await wait_js(page, "the new binding", f"document.querySelector('{row}') !== null")
        await conn.publish("dash.new", "", b"via fanout")
        info = await queue_info(conn, "dash.q")
        assert info is not None and info["messages"] == 5  # 4 ready + 1 new; 1 unacked
        unbind = page.locator(f"{row} button.unbind")
        await unbind.click()
        assert await unbind.inner_text() == "Sure?"
        await unbind.click()
        await wait_js(page, "the binding gone", f"document.querySelector('{row}') === null")
        delete = page.locator('#exchange-table tr[data-exchange="dash.new"] button.delete')
        await delete.click()
        await delete.click()
        await wait_js(
            page,
            "the exchange gone",
            "document.querySelector('#exchange-table tr[data-exchange=\"dash.new\"]') === null",
        )

        # Publish with a header, get one (ack), purge, delete.
        await page.goto(f"{base}#/queue/dash.q", wait_until="load")
        await page.fill("#pf-body", "from the page")
        await page.fill("#pf-headers", '{"origin": "form"}')
        await page.click("#pf-send")
        await wait_js(
            page,
            "the published message in the peek",
            """() =>
            [...document.querySelectorAll('#peek-table td.props')]
              .some(td => td.textContent.includes('header origin="form"'))""",
        )
        info = await queue_info(conn, "dash.q")
        assert info is not None and info["messages"] == 6
        await page.select_option("#gf-mode", "ack")
        await page.fill("#gf-count", "2")
        await page.click("#gf-get")
        await wait_js(
            page,
            "the get result",
            "document.querySelector('#gf-result').textContent.startsWith('2 message(s) taken')",
        )
        assert await page.locator("#gf-messages .got").count() == 2
        info = await queue_info(conn, "dash.q")
        assert info is not None and info["messages"] == 4
        purge = page.locator("#qp-actions button.purge")
        await purge.click()
        assert await purge.inner_text() == "Sure?"
        await purge.click()
        await wait_js(
            page,
            "the purge",
            "document.querySelector('#qp-result').textContent === 'purged 4 message(s)'",
        )
        info = await queue_info(conn, "dash.q")
        assert info is not None and info["messages"] == 0
        delete = page.locator("#qp-actions button.delete")
        await delete.click()
        await delete.click()
        await wait_js(page, "back on the queue list", "location.hash === '#/queues'")
        await wait_until(lambda: _gone(conn, "dash.q"), WAIT)
        assert errors == [], errors


async def _gone(conn: Any, name: str) -> bool:
    return await queue_info(conn, name) is None
