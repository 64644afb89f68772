"""What the UI sends a Dagster webserver to backfill and what it reads back, for the tests that drive
a real deployment (webserver + daemon): the production trio (test_production.py) or `dagster dev`
(test_ui_backfills.py)."""

import time

from services import graphql

LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) { __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } }
}"""
STATUS = "query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { status } } }"
CHECKS = """
query($key: AssetKeyInput!, $name: String!, $partition: String) {
  assetCheckExecutions(assetKey: $key, checkName: $name, partition: $partition, limit: 5) { status partition }
}"""
CHECK_NAMES = """
query($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode { assetChecksOrError { ... on AssetChecks { checks { name } } } } }
}"""
# What the UI's check "Partitions" tab asks for (AssetCheckPartitionHealthQuery in Dagster's UI).
PARTITION_STATUSES = """
query($key: AssetKeyInput!, $name: String!) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode { assetCheckOrError(checkName: $name) { ... on AssetCheck {
    partitionStatuses { ... on AssetCheckTimePartitionStatuses { ranges { startKey endKey status } } } } } } }
}"""
FINISHED = ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED", "FAILING", "CANCELING")


def launch(web: str, params: dict) -> str:
    """`launchPartitionBackfill` as the UI's *Launch backfill* sends it; returns the backfill id."""
    launched = graphql(web, LAUNCH, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return launched["backfillId"]


def wait_for(condition, alive, what: str, timeout: float = 120) -> None:
    """Poll `condition` every second until it holds; `alive()` raises (with the log) when a server died."""
    deadline = time.time() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        alive()
        assert time.time() < deadline, f"{what} not ready in {timeout}s"
        time.sleep(1)


def wait_backfill(web: str, backfill_id: str, alive, log_tail, timeout: float = 400) -> None:
    """Until the daemon has finished the backfill; it must have COMPLETED."""
    status = {}

    def finished():
        status["s"] = graphql(web, STATUS, {"id": backfill_id})["partitionBackfillOrError"]["status"]
        return status["s"] in FINISHED

    wait_for(finished, alive, f"backfill {backfill_id}", timeout)
    assert status["s"] in ("COMPLETED", "COMPLETED_SUCCESS"), f"backfill ended as {status['s']}: " + log_tail()


def check_names(web: str, key: list[str]) -> list[str]:
    got = graphql(web, CHECK_NAMES, {"key": {"path": key}})["assetNodeOrError"]
    return [c["name"] for c in got["assetChecksOrError"]["checks"]]


def latest_verdict(web: str, key: list[str], name: str, day: str) -> str | None:
    """The status of the check's latest execution for the day (None: never ran for it)."""
    got = graphql(web, CHECKS, {"key": {"path": key}, "name": name, "partition": day})["assetCheckExecutions"]
    if not got:
        return None
    assert got[0]["partition"] == day, got
    return got[0]["status"]


def assert_checks_passed(web: str, key: list[str], days: list[str]) -> list[str]:
    """Every check of the asset passed for every day, read back as the UI reads it; returns the names."""
    names = check_names(web, key)
    verdicts = {(n, d): latest_verdict(web, key, n, d) for n in names for d in days}
    assert set(verdicts.values()) <= {"SUCCEEDED"}, verdicts
    return names
