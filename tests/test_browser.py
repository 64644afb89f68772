"""The Dagster UI in a real browser: headless Chromium (Debian's, driven by Playwright) opens the
asset graph and a partitioned asset's checks after a day was materialized. Screenshots are kept in
test-artifacts/browser/."""

from conftest import PROJECT_ROOT, run_day
from playwright.sync_api import expect, sync_playwright
from services import dagster_dev

ARTIFACTS = PROJECT_ROOT / "test-artifacts/browser"
DAY = "2025-11-25"
# As the machine's notes advise: no background traffic a closed network would refuse.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_asset_graph_and_partitioned_checks_render(env, defs, instance, tmp_path):
    assert run_day(defs, instance, DAY).success  # recorded in the instance at $DAGSTER_HOME
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with dagster_dev(tmp_path / "dagster-dev.log") as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # The telemetry group's lineage (the global one shows every group collapsed).
        page.goto(f"{base}/locations/event-replay/asset-groups/telemetry", wait_until="networkidle", timeout=90_000)
        skip = page.get_by_role("button", name="Skip")  # the UI's first-visit newsletter prompt
        if skip.count():
            skip.first.click()
        for name in ("raw_events", "parsed_events", "projections", "redrive"):
            expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "asset-graph.png"), full_page=True)
        # Every other system's assets render in their groups too.
        for group, asset in (("ingestion_refill", "event_keys"), ("billing_reprocessing", "parsed_events"),
                             ("projection_replay", "aggregate_state")):
            page.goto(f"{base}/locations/event-replay/asset-groups/{group}", wait_until="networkidle", timeout=90_000)
            expect(page.get_by_text(asset, exact=True).first).to_be_visible(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / f"group-{group}.png"), full_page=True)

        page.goto(f"{base}/assets/telemetry/parsed_events?view=checks", wait_until="networkidle", timeout=90_000)
        for check in ("no_duplicate_event_ids", "raw_lines_accounted_for", "no_stale_files"):
            expect(page.get_by_text(check).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Succeeded").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "parsed-events-checks.png"), full_page=True)

        page.goto(f"{base}/assets/telemetry/parsed_events?view=partitions", wait_until="networkidle", timeout=90_000)
        expect(page.get_by_text("Materialized (1)")).to_be_visible(timeout=60_000)
        page.get_by_placeholder("Filter by name").fill(DAY)
        page.get_by_text(DAY, exact=True).first.click()
        expect(page.get_by_text("No partition selected")).to_have_count(0, timeout=30_000)
        expect(page.get_by_text("raw_lines", exact=True)).to_be_visible()  # the day's own metadata
        page.screenshot(path=str(ARTIFACTS / "parsed-events-partitions.png"), full_page=True)
        browser.close()
    shots = ("asset-graph.png", "parsed-events-checks.png", "parsed-events-partitions.png", "group-ingestion_refill.png")
    assert all((ARTIFACTS / f).stat().st_size > 10_000 for f in shots)
