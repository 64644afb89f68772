"""The Dagster UI in a real browser: headless Chromium (Debian's, driven by Playwright) opens the
asset graph, a partitioned asset's checks and a check's per-day verdicts after a ranged run and a
ranged `verify` that found one day tampered with. Screenshots are kept in test-artifacts/browser/."""

from pathlib import Path

from conftest import DEMO_DAYS, PROJECT_ROOT, RANGE_TAGS, run_range
from playwright.sync_api import expect, sync_playwright
from services import dagster_dev

from replay_defs.core.lake import Lake
from replay_defs.pipeline.committed import committed_parquet
from replay_defs.pipelines import TELEMETRY

ARTIFACTS = PROJECT_ROOT / "test-artifacts/browser"
DAY = "2025-11-25"
# As the machine's notes advise: no background traffic a closed network would refuse.
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


def test_asset_graph_and_partitioned_checks_render(env, defs, instance, tmp_path):
    # One run over three days (as a UI backfill or a CLI range runs it), recorded in the instance at
    # $DAGSTER_HOME; then a byte of the middle day changes and `verify` (checks only) runs the range.
    assert run_range(defs, instance, DEMO_DAYS[0], DEMO_DAYS[-1]).success
    lake = Lake(env["lake"])
    damaged = Path(lake.storage.path(committed_parquet(lake, TELEMETRY, DAY)[0]))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x5A
    damaged.write_bytes(bytes(data))
    verify = defs.resolve_job_def("telemetry_verify").execute_in_process(
        instance=instance, tags={RANGE_TAGS[0]: DEMO_DAYS[0], RANGE_TAGS[1]: DEMO_DAYS[-1]}, raise_on_error=False
    )
    assert not verify.success
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with dagster_dev(tmp_path / "dagster-dev.log") as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # The telemetry group's lineage (the global one shows every group collapsed).
        page.goto(f"{base}/locations/event-replay/asset-groups/telemetry", wait_until="networkidle", timeout=90_000)
        for name in ("raw_events", "parsed_events", "projections", "redrive"):
            expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "asset-graph.png"), full_page=True)
        # Every other system's assets render in their groups too.
        for group, asset in (
            ("ingestion_refill", "event_keys"),
            ("billing_reprocessing", "parsed_events"),
            ("projection_replay", "aggregate_state"),
        ):
            page.goto(f"{base}/locations/event-replay/asset-groups/{group}", wait_until="networkidle", timeout=90_000)
            expect(page.get_by_text(asset, exact=True).first).to_be_visible(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / f"group-{group}.png"), full_page=True)

        page.goto(f"{base}/assets/telemetry/parsed_events?view=checks", wait_until="networkidle", timeout=90_000)
        for check in ("no_duplicate_event_ids", "raw_lines_accounted_for", "no_stale_files"):
            expect(page.get_by_text(check).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Failed").first).to_be_visible()  # no_stale_files, after the tampering
        page.screenshot(path=str(ARTIFACTS / "parsed-events-checks.png"), full_page=True)

        # The check's own Partitions tab: a verdict per day, the tampered day failed.
        page.get_by_text("no_stale_files").first.click()
        page.get_by_role("tab", name="Partitions").last.click()
        expect(page.get_by_text("Failed (1)", exact=True)).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Passed (2)")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "no-stale-files-partitions.png"), full_page=True)
        page.goto(f"{base}/assets/telemetry/projections?view=checks", wait_until="networkidle", timeout=90_000)
        page.get_by_text("totals_match_parsed").first.click()
        page.get_by_role("tab", name="Partitions").last.click()
        expect(page.get_by_text("Passed (3)")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Failed (0)", exact=True)).to_be_visible()

        page.goto(f"{base}/assets/telemetry/parsed_events?view=partitions", wait_until="networkidle", timeout=90_000)
        expect(page.get_by_text("Materialized (3)")).to_be_visible(timeout=60_000)
        page.get_by_placeholder("Filter by name").fill(DAY)
        page.get_by_text(DAY, exact=True).first.click()
        expect(page.get_by_text("No partition selected")).to_have_count(0, timeout=30_000)
        expect(page.get_by_text("raw_lines", exact=True)).to_be_visible()  # the day's own metadata
        page.screenshot(path=str(ARTIFACTS / "parsed-events-partitions.png"), full_page=True)
        browser.close()
    shots = (
        "asset-graph.png",
        "parsed-events-checks.png",
        "no-stale-files-partitions.png",
        "parsed-events-partitions.png",
        "group-ingestion_refill.png",
    )
    assert all((ARTIFACTS / f).stat().st_size > 10_000 for f in shots)
