from conftest import DEMO_DAYS, check_verdicts, run_range


def test_range_run_passes_every_check_per_day(defs, instance):
    result = run_range(defs, instance, DEMO_DAYS[0], DEMO_DAYS[-1])
    assert result.success
    verdicts = check_verdicts(result)
    for check in (
        "no_duplicate_event_ids",
        "raw_lines_accounted_for",
        "no_stale_files",
        "totals_match_parsed",
        "deliveries_reconcile",
    ):
        for day in DEMO_DAYS:
            assert verdicts[(check, day)] is True, (check, day)
