"""The layout's rules (docs/architecture.md, "Where things live"), checked on the tree itself."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The engines: they do the work and must run, be tested and benchmarked without Dagster.
DAGSTER_FREE = [
    "replay_defs.core",
    "replay_defs.pipeline.spec",
    "replay_defs.pipeline.committed",
    "replay_defs.pipeline.store",
    "replay_defs.pipeline.postgres_store",
    "replay_defs.pipeline.shrink",
    "replay_defs.pipeline.delivery",
    "replay_defs.sinks.base",  # and the registry (replay_defs/sinks/__init__.py), which loads sink modules lazily
    "replay_defs.jsonl_files.parsing",
    "replay_defs.jsonl_files.demo",
    "replay_defs.clickhouse_table.parsing",
    "replay_defs.clickhouse_table.demo",
    "replay_defs.ingestion_refill.access_logs",
    "replay_defs.ingestion_refill.spec",
    "replay_defs.processed_events.engine",
    "replay_defs.projection_replay.engine",
    "replay_defs.projection_replay.stores",
    "replay_defs.projection_replay.live",
]


def _modules(names: list[str]) -> list[str]:
    out = []
    for name in names:
        path = ROOT / name.replace(".", "/")
        if path.is_dir():
            out += [f"{name}.{p.stem}" for p in sorted(path.glob("*.py")) if p.stem != "__init__"]
        else:
            out.append(name)
    return out


def test_the_core_and_the_engines_import_nothing_from_dagster():
    modules = _modules(DAGSTER_FREE)
    probe = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    leaked = sorted(n for n in sys.modules if n.split('.')[0] in "
        "('dagster', 'dagster_aws', 'assets', 'resources', 'sensors', 'jobs', 'partitions'))\n"
        "    assert not leaked, f'{m} imports the Dagster layer: {leaked[:5]}'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(modules) >= 20  # the probe covered the tree, not an empty list


LONG_REASON = "# long:"
MAX_LINES = 60


def _long_functions() -> list[str]:
    """Functions over MAX_LINES lines without a `# long: <reason>` comment just above them."""
    found = []
    for package in ("replay_defs", "assets", "resources", "sensors", "jobs", "partitions"):
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                length = node.end_lineno - node.lineno + 1
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if length > MAX_LINES and not lines[first - 2].strip().startswith(LONG_REASON):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_long_without_a_written_reason():
    assert _long_functions() == []


def test_the_length_rule_sees_a_long_function(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "replay_defs").mkdir()
    (tmp_path / "replay_defs" / "sample.py").write_text(
        f"def long_one():\n{body}\n\n\n# long: a reason\ndef explained():\n{body}\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _long_functions() == [f"replay_defs/sample.py:1 long_one ({MAX_LINES + 1} lines)"]


def test_every_asset_of_a_spec_is_declared_the_same_way():
    """One helper declares the partitioned assets: each asset of a spec gets its owners, its pool,
    a single-run backfill policy and the spec's daily partitions."""
    import dataclasses

    import dagster as dg

    from replay_defs.definitions import build_definitions
    from replay_defs.pipelines import BILLING, REFILLS, TELEMETRY

    specs = [dataclasses.replace(s, owners=("team:data-platform", "oncall@example.com")) for s in (TELEMETRY, BILLING)]
    refills = [dataclasses.replace(r, owners=("team:ingestion",)) for r in REFILLS]
    graph = build_definitions(specs, refills).resolve_asset_graph()
    seen = 0
    for spec in [*specs, *refills]:
        for key in graph.get_all_asset_keys():
            if key.path[0] != spec.name:
                continue
            node = graph.get(key)
            assert node.owners == list(spec.owners), key
            assert node.backfill_policy == dg.BackfillPolicy.single_run(), key
            assert node.partitions_def is not None and node.partitions_def.start.date().isoformat() == spec.start_date
            if key.path[-1] in ("parsed_events", "event_keys", "redrive"):
                assert node.pools, key  # rebuilds and deliveries run in their concurrency pools
            seen += 1
    assert seen >= 9  # telemetry 4, billing 3, the refill 2
