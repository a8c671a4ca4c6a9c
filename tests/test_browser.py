"""The demo in a real headless Chromium: type prompts, compare, see the map and three generations."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from chameleon_core import inference
from chameleon_core.inference import generate_rows

CHROMIUM = Path("/usr/bin/chromium")
if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.slow

import app  # noqa: E402
from conftest import SIX_DOMAINS  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync", "--disable-quic"]
MARKUP = "<b>bold</b> & <i>italic</i>"


@pytest.fixture(scope="module")
def page(served):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served[1])
        yield page
        browser.close()


def test_compare_in_the_browser(page, tmp_path):
    expect(page.locator("#status")).to_contain_text("Ready.", timeout=30_000)
    prompts = SIX_DOMAINS[:4] + [MARKUP]
    expect(page.locator("#prompts textarea")).not_to_have_value("", timeout=30_000)  # the page's example, filled on load
    page.locator("#prompts textarea").fill("\n".join(prompts))
    page.locator("#compare").click()

    expect(page.locator("#adapters [role=row][data-index]").first).to_be_visible(timeout=60_000)  # the last to come
    expect(page.locator("#cluster-map .js-plotly-plot")).to_be_visible()
    expect(page.locator("#cluster-map .scatterlayer .trace").last.locator(".textpoint")).to_have_count(len(prompts))
    table = page.locator("#generations [role=grid]")
    expect(table.locator("[role=row][data-index]")).to_have_count(len(prompts))
    headers = [h.strip() for h in table.locator("[role=columnheader]").all_inner_texts()]
    assert headers == ["#", "Prompt", "Base", "Static LoRA", "ChameleonLLM"]
    for column in (2, 3, 4):  # every model wrote something for every prompt
        expect(table.locator(f"[data-testid=cell-0-{column}]")).not_to_be_empty()
        expect(table.locator(f"[data-testid=cell-0-{column}]")).not_to_have_text(app.PENDING)

    markup_cell = table.locator(f"[data-testid=cell-{len(prompts) - 1}-1]")
    expect(markup_cell).to_have_text(MARKUP)  # shown literally ...
    assert page.locator("#generations b, #generations i, #assignments b").count() == 0  # ... never rendered
    expect(page.locator("#assignments [role=row][data-index]")).to_have_count(len(prompts))

    shot = tmp_path / "demo.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 20_000


def test_each_column_shows_as_its_model_writes_it(page, served, monkeypatch):
    """While static LoRA is held back, the page already shows the map, the clusters and the base column
    and says what it is doing."""
    release, base = threading.Event(), served[0].bundle_set.model

    def held(model, *args, **kwargs):
        if model is not base:
            release.wait(60)
        return generate_rows(model, *args, **kwargs)

    monkeypatch.setattr(inference, "generate_rows", held)
    page.locator("#prompts textarea").fill("\n".join(SIX_DOMAINS[:3]))
    page.locator("#compare").click()
    table = page.locator("#generations [role=grid]")
    try:
        expect(page.locator("#status")).to_contain_text("Generating with Static LoRA…", timeout=60_000)
        expect(table.locator("[data-testid=cell-0-2]")).not_to_have_text(app.PENDING)  # base: written
        expect(table.locator("[data-testid=cell-0-3]")).to_have_text(app.PENDING)  # static LoRA: not yet
        expect(page.locator("#cluster-map .scatterlayer .trace").last.locator(".textpoint")).to_have_count(3, timeout=60_000)
    finally:
        release.set()
    expect(page.locator("#status")).to_contain_text("Ready.", timeout=60_000)
    for column in (3, 4):
        expect(table.locator(f"[data-testid=cell-0-{column}]")).not_to_have_text(app.PENDING)


def test_an_example_click_shows_its_answers_then_comes_from_the_cache(page, served, monkeypatch):
    """The first click on an example runs the models and the page shows their answers; the second shows the
    same answers without a new request."""
    engine = served[0]
    submitted = []
    submit = engine.scheduler.submit
    monkeypatch.setattr(engine.scheduler, "submit", lambda *args: submitted.append(args) or submit(*args))
    expect(page.locator("#status")).to_contain_text("Ready.", timeout=30_000)
    table = page.locator("#generations [role=grid]")
    example = page.get_by_role("button", name=list(app.EXAMPLES)[1])
    example.click()
    rows = len(app.EXAMPLES["Science and numbers"].splitlines())
    expect(table.locator("[role=row][data-index]")).to_have_count(rows, timeout=120_000)
    expect(table.locator("[data-testid=cell-0-1]")).to_have_text(app.EXAMPLES["Science and numbers"].splitlines()[0])
    expect(table.locator("[data-testid=cell-0-4]")).not_to_have_text(app.PENDING, timeout=120_000)
    expect(page.locator("#prompts textarea")).to_have_value(app.EXAMPLES["Science and numbers"])
    answer = table.locator("[data-testid=cell-0-4]").inner_text()
    page.locator("#prompts textarea").fill(SIX_DOMAINS[0])
    page.locator("#compare").click()
    expect(table.locator("[role=row][data-index]")).to_have_count(1, timeout=60_000)
    expect(page.locator("#status")).to_contain_text("Ready.", timeout=60_000)
    example.click()
    expect(table.locator("[role=row][data-index]")).to_have_count(rows, timeout=30_000)
    expect(table.locator("[data-testid=cell-0-4]")).to_have_text(answer)
    assert [list(args[0].prompts) for args in submitted].count(app.EXAMPLES["Science and numbers"].splitlines()) == 1
