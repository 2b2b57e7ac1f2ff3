"""The arena in a real browser: `chatfabric up` serving the real SmolLM2 under two names, headless
Chromium (Debian's `chromium`, driven by Playwright) playing one anonymous battle. The names
must stay hidden until the vote and show after it, the vote must be in `ARENA` with the winner
clicked, and the Leaderboard tab must list both models. Its screenshots go to a temporary folder;
`make screenshots` runs it with CHATFABRIC_SCREENSHOTS=docs to regenerate the pictures in docs/.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.embedded import free_port
from chatfabric.proto.events import Vote
from chatfabric.proto.replay import replay
from conftest import Proc, wait_for

CHROMIUM = os.environ.get("CHATFABRIC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ANSWER_TIMEOUT_MS = 240_000  # two answers of the real model on a busy 2-core machine

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make install does)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: `apt-get install -y chromium` (make test does), or set CHATFABRIC_CHROMIUM")


@pytest.fixture(scope="module")
def arena(tmp_path_factory, model_dir):
    """`chatfabric up` with two models (the real SmolLM2 as 'smol-a' and 'smol-b') and the arena."""
    tmp = tmp_path_factory.mktemp("arena-up")
    gateway, arena_port, nats_port = free_port(), free_port(), free_port()
    env = {**os.environ, "CHATFABRIC_LOG_LEVEL": "INFO"}
    env.pop("NATS_URL", None)
    proc = Proc(["up", "--model-path", str(model_dir), "--model-name", "smol-a", "--model-path", str(model_dir),
                 "--model-name", "smol-b", "--port", str(gateway), "--arena-port", str(arena_port),
                 "--nats-port", str(nats_port), "--data-dir", str(tmp / "data"), "--leaderboard-refresh", "2",
                 "--battle-max-tokens", "48", "--snapshot-interval", "1"],
                env, tmp / "up.log").start()
    url = f"http://127.0.0.1:{arena_port}/"

    def healthy():
        if proc.popen.poll() is not None:
            raise AssertionError(f"chatfabric up exited:\n{proc.log()}")
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2) as resp:
                return resp.status == 200 and "Arena" in proc.log()
        except OSError:
            return False

    try:
        wait_for(healthy, 180, "the arena to answer")
        yield url, f"nats://127.0.0.1:{nats_port}"
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def page(arena):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 950})
        page.goto(arena[0])
        yield page
        browser.close()


def battle_text(page) -> str:
    return " ".join(page.locator(f"#battle-{part}").inner_text() for part in ("chat-a", "chat-b", "names", "status"))


async def votes(nats_url: str) -> list[Vote]:
    async with connect(BusConfig(url=nats_url), "test-reader", role="admin") as bus:
        return [item.message async for item in replay(bus, Vote)]


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where the screenshots go: a temporary folder, or $CHATFABRIC_SCREENSHOTS (`make screenshots`)."""
    folder = Path(os.environ.get("CHATFABRIC_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_an_anonymous_battle_in_the_browser(page, arena, screenshots):
    expect = playwright.expect
    page.locator("#battle-input textarea").fill("Name one colour of the sky.")
    page.locator("#battle-send").click()
    expect(page.locator("#battle-vote-1")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    before = battle_text(page)
    assert "smol-a" not in before and "smol-b" not in before, before
    assert "hidden until you vote" in before
    page.screenshot(path=str(screenshots / "arena-battle.png"))
    assert (screenshots / "arena-battle.png").stat().st_size > 0

    page.locator("#battle-vote-1").click()  # B is better
    expect(page.locator("#battle-status")).to_contain_text("is recorded", timeout=30_000)
    names = page.locator("#battle-names").inner_text()
    assert "smol-a" in names and "smol-b" in names
    expect(page.locator("#battle-vote-0")).to_be_disabled()
    model_b = names.split("Model B:")[1].strip()

    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # Playwright's loop runs in this one
        stored = thread.submit(asyncio.run, votes(arena[1])).result()
    assert len(stored) == 1 and stored[0].winner == "model_b" and stored[0].anonymous
    assert stored[0].model_b == model_b and {stored[0].model_a, stored[0].model_b} == {"smol-a", "smol-b"}

    page.get_by_role("tab", name="Leaderboard").click()
    table = page.locator("#leaderboard-table")
    expect(table).to_contain_text("smol-a", timeout=60_000)
    expect(table).to_contain_text("smol-b")
    expect(page.locator("#leaderboard-status")).to_contain_text("1 anonymous battle,")
    expect(page.locator("#leaderboard-status")).to_contain_text("latest vote counted cast at")
    page.screenshot(path=str(screenshots / "arena-leaderboard.png"), full_page=True)
