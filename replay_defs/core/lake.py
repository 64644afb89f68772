"""The lake: raw file listing, bookkeeping, and each day's outputs as Delta Lake tables.

The lake root is a local directory or `s3://bucket/prefix` (`storage.py`). A day pipeline's
outputs are Delta tables partitioned by `day` (the parsed events also by type, the quarantine by
day only). Publishing a day's new version:

1. the new files are written to a local staging directory by the pipeline (`new_staging`);
2. each is hashed (SHA-256) and copied into its table under a name no other version uses (a local
   lake moves it), so every earlier version's files stay readable for a rollback;
3. each table gets one commit that replaces the day's files (`overwrite` with a `day = D`
   partition filter; other days are untouched). The secondary tables (quarantine) commit first,
   the primary table (the parsed events) last: its commit's metadata records the day's whole
   state — every file of every table with its size, rows and hash, the versions of the other
   tables, the counts, the run. That commit is the moment the day changes.

A reader takes the day's state from the newest such commit and reads exactly its files: one
snapshot across types and tables, and verifiable by hash. A crash before the last commit leaves
the previous state in force (the secondary table may be ahead; the check that compares the live
tables with the state reports it until the day is rebuilt), and the uncommitted files are
orphans that `vacuum(full=True)` removes. Concurrent writers of the same day: one commit wins,
the other fails (`DayConflict`) and can be re-run; writers of different days both commit
(`_commit_table` retries a commit that lost only to other days).

A rollback re-commits the files of an earlier state (still in the table until vacuumed), after
checking their hashes, in one commit per table: no bytes are copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from filelock import FileLock

from replay_defs.core.storage import S3Settings, Storage, check_rel

DAY = "day"  # the partition column every day table has
_PARTITION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_OWNER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*/[A-Za-z][A-Za-z0-9_]*$")
META_KEY = "event_replay"
COMMIT_ATTEMPTS = 20  # commits of other days this one may lose to before giving up


def check_partition(partition: str) -> str:
    """Partition keys become path components: only a real YYYY-MM-DD date is accepted."""
    if not _PARTITION.fullmatch(partition):
        raise ValueError(f"partition {partition!r} is not a YYYY-MM-DD day")
    date.fromisoformat(partition)
    return partition


def check_slot(slot: str) -> str:
    return check_rel(slot)


@dataclass(frozen=True)
class RawRef:
    rel_path: str  # relative to the lake root
    uri: str
    arrival: datetime  # start of the arrival hour, UTC
    size: int
    mtime_ns: int  # with the size, what tells a rewritten raw file from the one a build read


class DamagedVersion(Exception):
    """A kept version whose files no longer match its recorded list and hashes."""


class DayConflict(Exception):
    """Another writer changed the day's files while this one was publishing (re-run it)."""


@dataclass(frozen=True)
class DayTable:
    """One Delta table of day outputs: `rel` in the lake, partitioned by `partition_by` (ending
    in `day`), with `schema` (without the partition columns that are not in the files)."""

    rel: str
    schema: pa.Schema
    partition_by: tuple[str, ...] = (DAY,)

    def full_schema(self) -> pa.Schema:
        s = self.schema
        for col in self.partition_by:
            if s.get_field_index(col) < 0:
                s = s.append(pa.field(col, pa.date32() if col == DAY else pa.string()))
        return s


@dataclass
class DayState:
    """A day's committed version: the primary table's version that published it, and every file
    of it (lake-relative) with {"size", "sha256", "rows", "table"}."""

    version: int
    entries: dict[str, dict]
    stats: dict
    run_id: str | None = None
    published_at: str | None = None
    tables: dict[str, int] = field(default_factory=dict)  # table -> its version holding the files

    @property
    def files(self) -> list[str]:
        return sorted(self.entries)

    @property
    def built_version(self) -> int:
        """The version whose build these files are: itself, or the one a rollback restored."""
        return self.stats.get("rolled_back_to", self.version)

    def files_of(self, table: str) -> list[str]:
        return sorted(f for f, e in self.entries.items() if e["table"] == table)

    def to_meta(self) -> dict:
        return {
            "entries": self.entries,
            "stats": self.stats,
            "run_id": self.run_id,
            "published_at": self.published_at,
            "tables": self.tables,
        }


class Lake:
    """The lake at `root` (a local directory or `s3://bucket/prefix`)."""

    def __init__(self, root: str | os.PathLike, s3: S3Settings | None = None, retention_hours: int = 168):
        if retention_hours < 0:
            raise ValueError("retention_hours must be 0 or more")
        self.storage = Storage(root, s3)
        self.retention_hours = retention_hours

    @property
    def root(self) -> str:
        return self.storage.root

    @property
    def is_local(self) -> bool:
        return self.storage.is_local

    def uri(self, rel: str) -> str:
        return self.storage.uri(rel)

    def rel_from_uri(self, uri: str) -> str:
        return self.storage.rel_from_uri(uri)

    def exists(self, rel: str) -> bool:
        return self.storage.info(rel) is not None

    def _internal(self, owner: str, *parts: str) -> str:
        if not _OWNER.fullmatch(owner):
            raise ValueError(f"owner {owner!r} must look like pipeline/asset")
        return "/".join(["_replay", owner, *parts])

    # ---- raw files -------------------------------------------------------------------------
    def list_raw(self, prefix: str, start: datetime, end: datetime, suffixes: tuple[str, ...]) -> list[RawRef]:
        """Files under `<prefix>/year=/month=/day=/hour=/` whose arrival hour is in [start, end)."""
        check_rel(prefix)
        refs: list[RawRef] = []
        first = start.replace(minute=0, second=0, microsecond=0)
        day = first.replace(hour=0)
        while day < end:
            for day_dir in self._day_dirs(prefix, day):
                for hour_name in self.storage.list_dirs(day_dir):
                    h = hour_name.removeprefix("hour=")
                    if hour_name == h or not h.isdigit() or not (len(h) <= 2 and int(h) < 24):
                        continue
                    hour = day.replace(hour=int(h))
                    if not first <= hour < end:
                        continue
                    for f in self.storage.list_files(f"{day_dir}/{hour_name}"):
                        name = f.rel.rsplit("/", 1)[1]
                        if name.endswith(suffixes) and not name.startswith((".", "_")):
                            refs.append(RawRef(f.rel, self.uri(f.rel), hour, f.size, f.mtime_ns))
            day += timedelta(days=1)
        return sorted(refs, key=lambda r: (r.arrival, r.rel_path))

    def _day_dirs(self, prefix: str, day: datetime) -> list[str]:
        # Accept zero-padded and plain numbers (`month=11/day=4` or `day=04`).
        out = []
        for m in sorted({f"{day.month:02d}", str(day.month)}):
            month_dir = f"{prefix}/year={day.year}/month={m}"
            names = set(self.storage.list_dirs(month_dir))
            out += [f"{month_dir}/{n}" for n in sorted({f"day={day.day:02d}", f"day={day.day}"} & names)]
        return out

    # ---- bookkeeping -----------------------------------------------------------------------
    def write_json(self, owner: str, name: str, data: dict) -> str:
        rel = self._internal(owner, name)
        self.storage.write_bytes(rel, json.dumps(data, indent=1, sort_keys=True).encode())
        return rel

    def read_json(self, owner: str, name: str) -> dict | None:
        data = self.storage.read_bytes(self._internal(owner, name))
        return None if data is None else json.loads(data)

    def append_jsonl(self, owner: str, name: str, rows: list[dict]) -> str:
        """Append rows to a JSON-lines file (dead letters, written batch by batch)."""
        rel = self._internal(owner, name)
        old = self.storage.read_bytes(rel) or b""
        self.storage.write_bytes(rel, old + b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows))
        return rel

    def read_jsonl(self, owner: str, name: str) -> list[dict]:
        data = self.storage.read_bytes(self._internal(owner, name)) or b""
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    # ---- staging and locking -----------------------------------------------------------------
    def lock(self, owner: str, partition: str):
        """Serialises a local lake's writers of one day (one machine). On S3 Delta's commit
        protocol decides: of two writers of the same day one commit fails."""
        if not self.is_local:
            return nullcontext()
        rel = self._internal(owner, "locks", f"{check_partition(partition)}.lock")
        path = Path(self.storage.path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), is_singleton=True)  # reentrant within a process

    def _staging_root(self, owner: str, partition: str) -> Path:
        if self.is_local:  # beside the tables, so publishing is a rename
            return Path(self.storage.path(self._internal(owner, "staging", check_partition(partition))))
        base = os.environ.get("EVENT_REPLAY_STAGING_DIR") or tempfile.gettempdir()
        lake_id = hashlib.sha256(self.root.encode()).hexdigest()[:12]  # two lakes never share staging
        return Path(base, "event-replay-staging", lake_id, owner.replace("/", "__"), check_partition(partition))

    def new_staging(self, owner: str, partition: str) -> Path:
        path = self._staging_root(owner, partition) / f"{os.getpid()}-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    def recover(self, owner: str, partition: str) -> bool:
        """Drop the local staging of runs that died before publishing. True if there was any.
        (A Delta commit is atomic: there is never a half-published day to finish.)"""
        staging = self._staging_root(owner, partition)
        dropped = False
        for run_dir in list(staging.iterdir()) if staging.is_dir() else []:
            if _staged_by_another_live_process(run_dir):
                continue  # another run of this day on this machine is still staging (an S3 lake has no day lock)
            shutil.rmtree(run_dir, ignore_errors=True)
            dropped = True
        return dropped

    # ---- publishing --------------------------------------------------------------------------
    def publish(
        self,
        owner: str,
        partition: str,
        staged: Path,
        tables: list[DayTable],
        stats: dict,
        run_id: str | None = None,
        only: dict[str, str] | None = None,
    ) -> DayState:
        """Publish the files under `staged/<table.rel>/<k=v>/…/*.parquet` as the day's new version
        of each table (see module docstring); `tables[0]` is the primary table. `only`: further
        partition values ({"type": "lock"}) the new files replace; the day's other files stay,
        and so do the tables not partitioned by them (a partial build stages none for those).
        Every file is checked to sit in the partitions it replaces before any is moved."""
        check_partition(partition)
        if only and not set(only) <= set(tables[0].partition_by):
            raise ValueError(f"{tables[0].rel} is not partitioned by {sorted(only)}: nothing to rebuild partially")
        token = uuid.uuid4().hex[:12]
        placed = []  # (staged file, its lake path, its table)
        for table in tables:
            base = Path(staged, table.rel)
            for local in sorted(base.rglob("*.parquet")) if base.is_dir() else []:
                inner = local.relative_to(base).as_posix()
                _check_placement(inner, table, partition, only)
                dirs, name = inner.rsplit("/", 1) if "/" in inner else ("", inner)
                placed.append((local, f"{table.rel}/{dirs}/{name.removesuffix('.parquet')}-{token}.parquet", table))
        entries: dict[str, dict] = {}
        for local, rel, table in placed:
            entries[rel] = {
                "table": table.rel,
                "size": local.stat().st_size,
                "sha256": _local_sha256(local),
                "rows": pq.ParquetFile(local).metadata.num_rows,
            }
            self.storage.put_file(local, rel, move=True)
        state = self._commit_day(owner, partition, tables, entries, stats, run_id, only)
        shutil.rmtree(staged, ignore_errors=True)
        return state

    def _commit_day(self, owner, day, tables, entries, stats, run_id, only=None, extra=None) -> DayState:
        with self.lock(owner, day):
            partial = {t.rel for t in tables if only and set(only) <= set(t.partition_by)}
            untouched = {t.rel for t in tables if only and t.rel not in partial}
            # Each table's snapshot and the files this build replaces in it, taken before the state
            # is read: a commit by anyone after this point is seen by `_commit_table`.
            dts = {t.rel: self._table(t) for t in tables}
            replaced = {t.rel: _selected(dts[t.rel], day, only if t.rel in partial else None) for t in tables}
            current = self.state(owner, day, tables[0])
            for rel, e in (current.entries if current else {}).items():
                # A partial rebuild keeps the day's files outside `only`, and the tables it does not split.
                if e["table"] in untouched or (e["table"] in partial and not _matches(rel, e["table"], only)):
                    entries.setdefault(rel, e)
            state = DayState(0, entries, stats, run_id, datetime.now(timezone.utc).isoformat(timespec="seconds"))
            for table in [*tables[1:], tables[0]]:  # the primary table commits last
                if table.rel in untouched:
                    state.tables[table.rel] = dts[table.rel].version()
                    continue
                adds = [
                    _add_action(rel, e, table)
                    for rel, e in entries.items()
                    if e["table"] == table.rel and (table.rel not in partial or _matches(rel, table.rel, only))
                ]
                meta = {"owner": owner, "day": day, "commit": uuid.uuid4().hex}
                if table is tables[0]:
                    meta.update(state.to_meta(), **(extra or {}))
                table_only = only if table.rel in partial else None
                state.tables[table.rel] = self._commit_table(
                    dts[table.rel], table, day, table_only, adds, replaced[table.rel], meta
                )
            state.version = state.tables[tables[0].rel]
            return state

    def _commit_table(self, dt, table: DayTable, day: str, only, adds, replaced: set[str], meta: dict) -> int:
        """Replace the day's files (those `only` selects) with `adds` in one commit; its version.
        Delta's own retry would count this overwrite as a read of the whole table (a concurrent
        commit of another day fails it) and would let two first builds of a day both add their
        files. So the commit is tried without it, and retried here only while the files it
        replaces are still the ones this build saw: another writer of the day makes it fail."""
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties

        filters = [(DAY, "=", day)] + [(k, "=", v) for k, v in (only or {}).items()]
        props = CommitProperties(custom_metadata={META_KEY: json.dumps(meta)}, max_commit_retries=0)
        for _ in range(COMMIT_ATTEMPTS):
            version = dt.version() + 1  # without retries the commit lands exactly there or fails
            try:
                dt.create_write_transaction(
                    adds,
                    "overwrite",
                    table.full_schema(),
                    partition_by=list(table.partition_by),
                    partition_filters=filters,
                    commit_properties=props,
                )
                return version
            except CommitFailedError:
                dt.update_incremental()
                if _selected(dt, day, only) != replaced:
                    raise DayConflict(
                        f"{table.rel} {day}: another writer changed the day while this build was publishing; re-run it"
                    ) from None
        raise DayConflict(f"{table.rel} {day}: {COMMIT_ATTEMPTS} commits lost to other writers; re-run it")

    def _table(self, table: DayTable):
        """The Delta table, created empty (schema, partitions) the first time."""
        from deltalake import DeltaTable, write_deltalake

        self.storage.writable(table.rel)  # its log is written there too
        uri, opts = self.storage.table_uri(table.rel), self.storage.delta_options()
        if not DeltaTable.is_deltatable(uri, storage_options=opts):
            write_deltalake(
                uri,
                table.full_schema().empty_table(),
                partition_by=list(table.partition_by),
                storage_options=opts,
                mode="ignore",
            )
        return DeltaTable(uri, storage_options=opts)

    # ---- reading states ----------------------------------------------------------------------
    def _commits(self, table: str) -> list[dict]:
        """Every commit of `table` written by this project, newest first (empty when it has none)."""
        from deltalake import DeltaTable

        uri, opts = self.storage.table_uri(table), self.storage.delta_options()
        if not DeltaTable.is_deltatable(uri, storage_options=opts):
            return []
        out = []
        for c in DeltaTable(uri, storage_options=opts).history():
            if META_KEY in c:
                meta = json.loads(c[META_KEY])
                meta["version"] = c["version"]
                out.append(meta)
        return out

    def day_states(self, owner: str, day: str, table: DayTable | str) -> list[DayState]:
        """Every recorded state of the day in the primary `table`, newest first."""
        rel = table if isinstance(table, str) else table.rel
        return [
            _day_state(c, rel)
            for c in self._commits(rel)
            if c.get("owner") == owner and c.get("day") == day and "entries" in c
        ]

    def latest_states(self, owner: str, table: DayTable | str) -> dict[str, DayState]:
        """Every committed day's current state (what `state` gives for it), by day, from one read
        of the table's history: for readers of many days, where `state` per day re-reads it each time."""
        rel = table if isinstance(table, str) else table.rel
        latest: dict[str, DayState] = {}
        for c in self._commits(rel):  # newest first
            if c.get("owner") == owner and "entries" in c and c["day"] not in latest:
                latest[c["day"]] = _day_state(c, rel)
        return dict(sorted(latest.items()))

    def state(self, owner: str, day: str, table: DayTable | str) -> DayState | None:
        states = self.day_states(owner, check_partition(day), table)
        return states[0] if states else None

    def committed_days(self, owner: str, table: DayTable | str) -> list[str]:
        rel = table if isinstance(table, str) else table.rel
        return sorted({c["day"] for c in self._commits(rel) if c.get("owner") == owner and "entries" in c})

    def kept_versions(self, owner: str, day: str, table: DayTable | str) -> list[int]:
        """Versions the day was built as (rollbacks re-commit one of them) whose files are all
        still in the lake (not vacuumed), oldest first."""
        return sorted(
            s.version
            for s in self.day_states(owner, day, table)
            if s.built_version == s.version and all(self.exists(f) for f in s.entries)
        )

    def kept_state(self, owner: str, day: str, table: DayTable | str, version: int) -> DayState:
        for s in self.day_states(owner, day, table):
            if s.version == version:
                return s
        raise LookupError(f"{owner} {day}: version {version} is not recorded")

    # ---- integrity ----------------------------------------------------------------------------
    def damaged_files(self, state: DayState | None, files: list[str]) -> list[str]:
        """Of the committed `files`, those whose bytes are no longer the committed ones."""
        if state is None:
            return [f"missing: {f}" for f in files]
        return sorted(p for f in files if (p := self._file_problem(f, state.entries[f])))

    def _file_problem(self, rel: str, entry: dict) -> str | None:
        info = self.storage.info(rel)
        if info is None:
            return f"missing: {rel}"
        if info.size != entry["size"]:
            return f"changed size: {rel}"
        if self.storage.sha256(rel) != entry["sha256"]:
            return f"changed content: {rel}"
        return None

    def live_files(self, table: DayTable, day: str) -> dict[str, int]:
        """The day's files in the table's current snapshot: {lake path: bytes}."""
        from deltalake import DeltaTable

        uri, opts = self.storage.table_uri(table.rel), self.storage.delta_options()
        if not DeltaTable.is_deltatable(uri, storage_options=opts):
            return {}
        adds = pa.table(DeltaTable(uri, storage_options=opts).get_add_actions(flatten=True))
        out = {}
        for path, size, d in zip(
            adds["path"].to_pylist(), adds["size_bytes"].to_pylist(), adds[f"partition.{DAY}"].to_pylist()
        ):
            if str(d) == day:
                out[f"{table.rel}/{path}"] = size
        return out

    def stale_files(self, owner: str, day: str, tables: list[DayTable]) -> list[str]:
        """How the lake differs from the day's committed state: files the tables hold for the day
        that the state does not list (committed behind its back), files it lists that are gone from
        the table or the store, and files whose size or content hash differs from the recorded one."""
        state = self.state(owner, day, tables[0])
        entries = state.entries if state else {}
        problems = []
        for table in tables:
            live = self.live_files(table, day)
            listed = {f for f, e in entries.items() if e["table"] == table.rel}
            problems += [f"unexpected: {f}" for f in sorted(set(live) - listed)]
            problems += [f"not in the table: {f}" for f in sorted(listed - set(live))]
        problems += [p for f, e in entries.items() if (p := self._file_problem(f, e))]
        return sorted(problems)

    # ---- reading files -----------------------------------------------------------------------
    def dataset(self, files: list[str], schema: pa.Schema | None = None) -> ds.Dataset:
        """The lake files as one pyarrow dataset (DuckDB scans it), local or on S3."""
        return ds.dataset(
            [self.storage.path(f) for f in files], schema=schema, format="parquet", filesystem=self.storage.fs
        )

    def sql(self, files: list[str], query: str, params: dict | None = None) -> list[tuple]:
        """`query` over the lake files as the relation `files` (DuckDB, in memory); [] for no files."""
        import duckdb

        if not files:
            return []
        with duckdb.connect() as con:
            con.register("files", self.dataset(files))
            return con.execute(query, params or {}).fetchall()

    # ---- rollback and retention ----------------------------------------------------------------
    def rollback(
        self, owner: str, day: str, tables: list[DayTable], run_id: str | None = None, to: int | None = None
    ) -> DayState:
        """Make the newest kept version older than the current one live again (or version `to`),
        in one commit per table with that version's own files (checked by hash first)."""
        check_partition(day)
        with self.lock(owner, day):
            states = self.day_states(owner, day, tables[0])
            current = states[0] if states else None
            kept = self.kept_versions(owner, day, tables[0])
            if to is not None:
                if current is not None and to == current.built_version:
                    raise LookupError(f"{owner} {day}: version {to} is already the live version")
                if to not in kept:
                    raise LookupError(f"{owner} {day}: version {to} is not kept (kept: {kept or 'none'})")
                v = to
            else:
                older = [v for v in kept if current is None or v < current.built_version]
                if not older:
                    raise LookupError(f"{owner} {day}: no earlier version is kept to roll back to")
                v = older[-1]
            prior = next(s for s in states if s.version == v)
            damage = self.damaged_files(prior, prior.files)
            if damage:
                raise DamagedVersion(
                    f"{owner} {day}: kept version {v} is damaged, refusing to publish it "
                    f"({len(damage)} problem(s): {'; '.join(damage[:5])})"
                )
            stats = {**prior.stats, "rolled_back_to": v}
            return self._commit_day(owner, day, tables, dict(prior.entries), stats, run_id)

    def vacuum(self, tables: list[str], retention_hours: int | None = None, dry_run: bool = True) -> dict[str, int]:
        """Delete files no version within the retention still uses (and orphans of killed writers).
        Versions older than the retention can no longer be rolled back to. Refuses a table where
        it would delete a file some day's live state still reads (a secondary table that a crash
        left ahead of its day's state): rebuild that day first."""
        from deltalake import DeltaTable

        hours = self.retention_hours if retention_hours is None else retention_hours
        read_by_states = self._files_of_live_states(tables)
        out = {}
        for rel in tables:
            uri, opts = self.storage.table_uri(rel), self.storage.delta_options()
            if not DeltaTable.is_deltatable(uri, storage_options=opts):
                continue
            table = DeltaTable(uri, storage_options=opts)
            doomed = table.vacuum(retention_hours=hours, enforce_retention_duration=False, dry_run=True, full=True)
            still_read = sorted({f"{rel}/{p}" for p in doomed} & read_by_states)
            if still_read:
                raise ValueError(
                    f"{rel}: vacuum would delete {len(still_read)} file(s) a day's committed state still reads "
                    f"(e.g. {still_read[0]}); re-materialize those days, then vacuum"
                )
            if not dry_run:
                doomed = table.vacuum(retention_hours=hours, enforce_retention_duration=False, dry_run=False, full=True)
            out[rel] = len(doomed)
        return out

    def _files_of_live_states(self, tables: list[str]) -> set[str]:
        """Every file the newest state of each (owner, day) recorded in these tables lists."""
        newest: dict[tuple[str, str], dict] = {}
        for rel in tables:
            for c in self._commits(rel):  # newest first
                if "entries" in c:
                    newest.setdefault((c["owner"], c["day"]), c["entries"])
        return {f for entries in newest.values() for f in entries}


def _day_state(commit: dict, rel: str) -> DayState:
    """The day's state a commit of the primary table `rel` recorded."""
    return DayState(
        commit["version"],
        commit["entries"],
        commit["stats"],
        commit.get("run_id"),
        commit.get("published_at"),
        {**commit.get("tables", {}), rel: commit["version"]},
    )


def _check_placement(inner: str, table: DayTable, day: str, only: dict[str, str] | None) -> None:
    """A staged file (`inner`: its path in the table) must sit under the table's partitions, in
    the day published and, in a partial rebuild, in the partitions `only` names."""
    where = f"{table.rel}/{inner}"
    if only and not set(only) <= set(table.partition_by):
        raise ValueError(
            f"{where}: {table.rel} is not partitioned by {sorted(only)}; a partial build cannot replace it"
        )
    parts = dict(p.split("=", 1) for p in inner.split("/")[:-1] if "=" in p)
    missing = [c for c in table.partition_by if c not in parts]
    if missing:
        raise ValueError(f"{where}: no {missing} in its path; a {table.rel} file must sit under {table.partition_by}")
    want = {DAY: day, **(only or {})}
    wrong = {k: parts[k] for k, v in want.items() if parts[k] != v}
    if wrong:
        raise ValueError(f"{where}: staged under {wrong}, but this build replaces {want}")


def _selected(dt, day: str, only: dict[str, str] | None) -> set[str]:
    """The files of `dt`'s snapshot in the day (and the `only` partitions), table-relative."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if not adds.num_rows:
        return set()
    cols = {c: adds[f"partition.{c}"].to_pylist() for c in (DAY, *(only or {}))}
    want = {DAY: day, **(only or {})}
    return {
        path for i, path in enumerate(adds["path"].to_pylist()) if all(str(cols[c][i]) == v for c, v in want.items())
    }


def _staged_by_another_live_process(run_dir: Path) -> bool:
    pid = run_dir.name.split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _matches(rel: str, table: str, only: dict[str, str]) -> bool:
    parts = dict(p.split("=", 1) for p in rel[len(table) + 1 :].split("/")[:-1] if "=" in p)
    return all(parts.get(k, v) == v for k, v in only.items())


def _add_action(rel: str, entry: dict, table: DayTable):
    from deltalake.transaction import AddAction

    inner = rel[len(table.rel) + 1 :]
    parts = dict(p.split("=", 1) for p in inner.split("/")[:-1] if "=" in p)
    missing = [c for c in table.partition_by if c not in parts]
    if missing:
        raise ValueError(f"{rel}: no {missing} in its path; a {table.rel} file must sit under {table.partition_by}")
    return AddAction(
        inner,
        entry["size"],
        {c: parts[c] for c in table.partition_by},
        int(datetime.now(timezone.utc).timestamp() * 1000),
        True,
        json.dumps({"numRecords": entry["rows"]}),
    )


def _local_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
