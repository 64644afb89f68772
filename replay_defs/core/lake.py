"""The lake: raw file listing, and atomic, versioned replacement of a partition's outputs.

A partition's outputs are a set of *slots*: lake directories it owns, such as
`telemetry_flat/type=lock/day=2025-11-24`. Publishing a new version:

1. the new slots are fully written under `_replay/<owner>/staging/<partition>/<token>/`;
2. a journal records the old and new state (write-temp-then-rename, so it is all or nothing);
3. every old slot is moved to `_replay/<owner>/versions/<partition>/v<N>/`; anything in the
   partition's slot patterns that the old version did not commit (stale output of an older tool,
   a file copied in by hand) is swept to `_replay/<owner>/stray/<partition>/v<N>/` instead, so a
   rollback never brings it back; then each new slot is renamed into place;
4. the state file `_replay/<owner>/state/<partition>.json` (version, files with their size and
   SHA-256, stats) is replaced and the journal removed. Old versions beyond `keep_versions` are
   pruned.

Integrity is by content: a file's hash is taken from the staged file, before it is published,
and every later reader that must trust the files (the stale-files check, the projection fold, the
archiving of an old version, a rollback) compares hashes, not sizes.

Every step is a rename, and each is decidable from what is on disk, so `recover` can finish an
interrupted publish after a crash at any point: a re-run then sees exactly a clean run's outputs.
`rollback` publishes an older kept version again through the same path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote, unquote

from filelock import FileLock

_PARTITION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_OWNER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*/[A-Za-z][A-Za-z0-9_]*$")
_SLOT_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]*$")


def check_partition(partition: str) -> str:
    """Partition keys become path components: only a real YYYY-MM-DD date is accepted."""
    if not _PARTITION.fullmatch(partition):
        raise ValueError(f"partition {partition!r} is not a YYYY-MM-DD day")
    date.fromisoformat(partition)
    return partition


def check_slot(slot: str) -> str:
    parts = slot.split("/")
    if not parts or any(not _SLOT_PART.fullmatch(p) or p in (".", "..") for p in parts):
        raise ValueError(f"slot {slot!r} is not a safe relative lake path")
    return slot


@dataclass(frozen=True)
class RawRef:
    rel_path: str  # relative to the lake root
    uri: str
    arrival: datetime  # start of the arrival hour, UTC
    size: int
    mtime_ns: int  # with the size, what tells a rewritten raw file from the one a build read


class DamagedVersion(Exception):
    """A kept version whose files no longer match its recorded list and hashes."""


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _size_and_hash(entry) -> tuple[int, str | None]:
    """A state's file entry: {"size", "sha256"}, or a bare size (states written before hashes)."""
    if isinstance(entry, dict):
        return entry["size"], entry.get("sha256")
    return entry, None


def file_problem(path: Path, entry) -> str | None:
    """Why the file at `path` is not the one a state recorded (None when it is)."""
    if not path.is_file():
        return "missing"
    size, digest = _size_and_hash(entry)
    if path.stat().st_size != size:
        return "changed size"
    if digest is not None and file_sha256(path) != digest:
        return "changed content"
    return None


@dataclass
class PartitionState:
    version: int
    slots: dict[str, dict[str, dict]]  # slot -> {file name: {"size": bytes, "sha256": hex digest}}
    stats: dict
    run_id: str | None = None
    published_at: str | None = None

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "slots": self.slots,
            "stats": self.stats,
            "run_id": self.run_id,
            "published_at": self.published_at,
        }

    @classmethod
    def from_json(cls, d: dict) -> PartitionState:
        return cls(d["version"], d["slots"], d.get("stats", {}), d.get("run_id"), d.get("published_at"))

    @property
    def files(self) -> list[str]:
        return sorted(f"{slot}/{name}" for slot, names in self.slots.items() for name in names)

    def problems(self, root: Path, only: list[str] | None = None) -> list[str]:
        """Files of this state under `root` that are missing or differ from their recorded size
        and hash (`only`: just these lake-relative files), as "<problem>: <file>"."""
        wanted = None if only is None else set(only)
        out = []
        for slot, names in self.slots.items():
            for name, entry in names.items():
                rel = f"{slot}/{name}"
                if wanted is None or rel in wanted:
                    problem = file_problem(root / rel, entry)
                    if problem:
                        out.append(f"{problem}: {rel}")
        return sorted(out)


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)


def _replace_move(src: Path, dst: Path) -> None:
    """Move, replacing whatever an earlier sweep left at dst."""
    if dst.is_dir():
        shutil.rmtree(dst)
    _move(src, dst)


def _scan_slot(path: Path) -> dict[str, dict]:
    return {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(path.iterdir()) if p.is_file()}


class Lake:
    """A lake on a local directory (the embedded default)."""

    def __init__(self, root: str | os.PathLike, keep_versions: int = 2):
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1, or rollback has nothing to restore")
        self.root = Path(root).resolve()
        self.keep_versions = keep_versions

    # ---- paths -----------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        """A lake-relative path as a local path, for reading; refuses `..`, absolute paths and
        anything else that leaves the lake by its name. Symlinks inside the lake are followed (a
        raw folder on another volume can be linked in); writing through one never is (`_writable`)."""
        p = Path(os.path.normpath(self.root / rel))
        if p != self.root and not p.is_relative_to(self.root):
            raise ValueError(f"{rel!r} is outside the lake at {self.root}")
        return p

    def _writable(self, path: Path) -> Path:
        """`path`, if writing there stays inside the lake once symlinks are followed."""
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(
                f"{path} leads outside the lake at {self.root} (through a symlink): refusing to write there"
            )
        return path

    def uri(self, rel: str) -> str:
        # Like Path.as_uri, but keeps `=` of hive-style paths readable.
        return "file://" + quote((self.root / rel).as_posix(), safe="/=-_.~")

    def rel_from_uri(self, uri: str) -> str:
        """Inverse of `uri`; refuses anything outside the lake."""
        prefix = self.uri("") + "/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri!r} is not inside the lake at {self.root}")
        rel = unquote(uri[len(prefix) :])
        if any(part in ("", ".", "..") for part in rel.split("/")):
            raise ValueError(f"{uri!r} escapes the lake or is not a plain path")
        return rel

    def _internal(self, owner: str, *parts: str) -> Path:
        if not _OWNER.fullmatch(owner):
            raise ValueError(f"owner {owner!r} must look like pipeline/asset")
        return self._writable(self.root.joinpath("_replay", owner, *parts))

    # ---- raw files -------------------------------------------------------------------------
    def list_raw(self, prefix: str, start: datetime, end: datetime, suffixes: tuple[str, ...]) -> list[RawRef]:
        """Files under `<prefix>/year=/month=/day=/hour=/` whose arrival hour is in [start, end)."""
        check_slot(prefix)
        refs: list[RawRef] = []
        hour = start.replace(minute=0, second=0, microsecond=0)
        while hour < end:
            for d in self._hour_dirs(prefix, hour):
                for p in sorted(d.iterdir()):
                    if p.is_file() and p.name.endswith(suffixes) and not p.name.startswith((".", "_")):
                        rel = p.relative_to(self.root).as_posix()
                        st = p.stat()
                        refs.append(RawRef(rel, self.uri(rel), hour, st.st_size, st.st_mtime_ns))
            hour += timedelta(hours=1)
        return refs

    def _hour_dirs(self, prefix: str, hour: datetime) -> list[Path]:
        # Accept zero-padded and plain numbers (`month=11/day=4` or `day=04`).
        out = []
        for m in {f"{hour.month:02d}", str(hour.month)}:
            for d in {f"{hour.day:02d}", str(hour.day)}:
                for h in {f"{hour.hour:02d}", str(hour.hour)}:
                    p = self.root / prefix / f"year={hour.year}" / f"month={m}" / f"day={d}" / f"hour={h}"
                    if p.is_dir():
                        out.append(p)
        return out

    def write_json(self, owner: str, name: str, data: dict) -> Path:
        path = self._internal(owner, name)
        _write_json_atomic(path, data)
        return path

    def append_jsonl(self, owner: str, name: str, rows: list[dict]) -> Path:
        """Append rows to a JSON-lines file (e.g. dead letters, written batch by batch)."""
        path = self._internal(owner, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        return path

    def read_json(self, owner: str, name: str) -> dict | None:
        path = self._internal(owner, name)
        return json.loads(path.read_text()) if path.exists() else None

    # ---- versioned partition outputs -------------------------------------------------------
    def lock(self, owner: str, partition: str) -> FileLock:
        path = self._internal(owner, "locks", f"{check_partition(partition)}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Singleton: re-acquiring in the same process (an asset holding the lock while it
        # publishes) is reentrant instead of a self-deadlock.
        return FileLock(str(path), is_singleton=True)

    def new_staging(self, owner: str, partition: str) -> Path:
        path = self._internal(owner, "staging", check_partition(partition), uuid.uuid4().hex)
        path.mkdir(parents=True)
        return path

    def state(self, owner: str, partition: str) -> PartitionState | None:
        path = self._internal(owner, "state", f"{check_partition(partition)}.json")
        return PartitionState.from_json(json.loads(path.read_text())) if path.exists() else None

    def kept_versions(self, owner: str, partition: str) -> list[int]:
        d = self._internal(owner, "versions", check_partition(partition))
        if not d.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in d.iterdir() if p.name.startswith("v") and (p / "state.json").exists())

    def matching_slots(self, patterns: list[str]) -> list[str]:
        """Existing lake directories matching slot patterns such as `flat/type=*/day=2025-11-24`."""
        found = set()
        for pattern in patterns:
            for p in self.root.glob(pattern):
                if p.is_dir():
                    found.add(p.relative_to(self.root).as_posix())
        return sorted(found)

    def publish(
        self,
        owner: str,
        partition: str,
        staged: Path,
        slot_patterns: list[str],
        stats: dict,
        run_id: str | None = None,
        version: int | None = None,
    ) -> PartitionState:
        """Replace the partition's outputs with the slots under `staged` (see module docstring)."""
        check_partition(partition)
        new_slots = {}
        for pattern in slot_patterns:
            for p in staged.glob(pattern):
                if p.is_dir():
                    new_slots[check_slot(p.relative_to(staged).as_posix())] = _scan_slot(p)
        with self.lock(owner, partition):
            self._recover_locked(owner, partition)
            current = self.state(owner, partition)
            old_version = current.version if current else 0
            if version is None:
                version = max([old_version, *self.kept_versions(owner, partition)]) + 1
            new = PartitionState(
                version, new_slots, stats, run_id, datetime.now(timezone.utc).isoformat(timespec="seconds")
            )
            old_slots = sorted(set(current.slots if current else ()) | set(self.matching_slots(slot_patterns)))
            journal = {
                "old": current.to_json() if current else None,
                "old_version": old_version,
                "old_slots": old_slots,
                "new": new.to_json(),
                "staged": str(staged),
            }
            _write_json_atomic(self._internal(owner, "journal", f"{partition}.json"), journal)
            self._apply(owner, partition, journal)
            return new

    def recover(self, owner: str, partition: str) -> bool:
        """Finish a publish interrupted by a crash and drop staging of runs that died before
        publishing. Call it holding `lock()`, before staging new outputs. True if it did work."""
        with self.lock(owner, partition):
            did = self._recover_locked(owner, partition)
            staging = self._internal(owner, "staging", check_partition(partition))
            if staging.is_dir():
                did = did or any(staging.iterdir())
                shutil.rmtree(staging)
            # Temp files of JSON writes a crash interrupted (the write itself never landed).
            dirs = [self._internal(owner, "journal"), self._internal(owner, "state")]
            dirs += self._internal(owner, "versions", partition).glob("v*")
            for d in dirs:
                for tmp in d.glob(".*.tmp"):
                    if tmp.name.startswith((f".{partition}.json.", ".state.json.")):
                        tmp.unlink()
                        did = True
            return did

    def _recover_locked(self, owner: str, partition: str) -> bool:
        journal_path = self._internal(owner, "journal", f"{partition}.json")
        if journal_path.exists():
            self._apply(owner, partition, json.loads(journal_path.read_text()))
            return True
        return False

    def _apply(self, owner: str, partition: str, journal: dict) -> None:
        staged = Path(journal["staged"])
        # A journal only ever names staging or a kept version of this owner: never act elsewhere.
        if not staged.resolve().is_relative_to(self._internal(owner).resolve()):
            raise ValueError(
                f"{owner} {partition}: the journal names {staged}, outside {self._internal(owner)}; refusing to apply it"
            )
        new = PartitionState.from_json(journal["new"])
        old_version = journal["old_version"]
        archive = self._internal(owner, "versions", partition, f"v{old_version}")
        # Files the old version did not commit (left by another tool, copied in by hand) are
        # swept aside, not archived: a rollback must never bring them back.
        stray = self._internal(owner, "stray", partition, f"v{old_version}")
        committed = (journal["old"] or {}).get("slots", {})
        for slot in journal["old_slots"]:
            src, dst = self._writable(self.root / slot), archive / slot
            # A slot that is also new and no longer staged has already been swapped in.
            if not (src.exists() and not dst.exists() and (slot not in new.slots or (staged / slot).exists())):
                continue
            keep = committed.get(slot)
            if keep is None:
                _replace_move(src, stray / slot)
                continue
            # Only files still holding the committed bytes are archived: a damaged one is swept
            # aside, and the archived state keeps listing it, so a rollback to it is refused.
            for p in list(src.iterdir()):
                if p.name not in keep or file_problem(p, keep[p.name]):
                    _replace_move(p, stray / slot / p.name)
            _move(src, dst)
        if journal["old"] is not None:
            _write_json_atomic(archive / "state.json", journal["old"])
        for slot in new.slots:
            if (staged / slot).exists():
                _move(staged / slot, self._writable(self.root / slot))
        _write_json_atomic(self._internal(owner, "state", f"{partition}.json"), new.to_json())
        os.remove(self._internal(owner, "journal", f"{partition}.json"))
        shutil.rmtree(staged, ignore_errors=True)
        try:  # the per-partition staging folder, when this was its last run
            staged.parent.rmdir()
        except OSError:
            pass
        self._prune(owner, partition, keep_current=new.version)

    def _prune(self, owner: str, partition: str, keep_current: int) -> None:
        kept = [v for v in self.kept_versions(owner, partition) if v != keep_current]
        for v in kept[: max(0, len(kept) - self.keep_versions)]:
            shutil.rmtree(self._internal(owner, "versions", partition, f"v{v}"))
        # The current version is live; an archived copy of it is redundant.
        same = self._internal(owner, "versions", partition, f"v{keep_current}")
        if same.exists():
            shutil.rmtree(same)
        # Swept-aside strays: the newest `keep_versions` sweeps are kept, like versions.
        strays = self._internal(owner, "stray", partition)
        if strays.is_dir():
            sweeps = sorted((d for d in strays.iterdir() if d.name[1:].isdigit()), key=lambda d: int(d.name[1:]))
            for d in sweeps[: max(0, len(sweeps) - self.keep_versions)]:
                shutil.rmtree(d)

    def rollback(
        self, owner: str, partition: str, slot_patterns: list[str], run_id: str | None = None, to: int | None = None
    ) -> PartitionState:
        """Make the newest kept version older than the current one live again (or version `to`).
        The replaced version is kept in turn, so `to` can bring it back."""
        check_partition(partition)
        with self.lock(owner, partition):
            self.recover(owner, partition)
            versions = self.kept_versions(owner, partition)
            current = self.state(owner, partition)
            if to is not None:
                if current is not None and to == current.version:
                    raise LookupError(f"{owner} {partition}: version {to} is already the live version")
                if to not in versions:
                    raise LookupError(f"{owner} {partition}: version {to} is not kept (kept: {versions or 'none'})")
                v = to
            else:
                older = [v for v in versions if current is None or v < current.version]
                if not older:
                    raise LookupError(f"{owner} {partition}: no earlier version is kept to roll back to")
                v = older[-1]
            src = self._internal(owner, "versions", partition, f"v{v}")
            prior = PartitionState.from_json(json.loads((src / "state.json").read_text()))
            damage = prior.problems(src) + self._unlisted(src, prior)
            if damage:
                raise DamagedVersion(
                    f"{owner} {partition}: kept version {v} is damaged, refusing to publish it "
                    f"({len(damage)} problem(s): {'; '.join(damage[:5])})"
                )
            # The archived version is published in place, as its own staging: until the journal
            # exists nothing has moved, so a crash at any point loses no version.
            return self.publish(owner, partition, src, slot_patterns, prior.stats, run_id=run_id, version=v)

    @staticmethod
    def _unlisted(root: Path, state: PartitionState) -> list[str]:
        """Files under a kept version's `root` that its state does not list (anywhere, not only in
        its slots: a version is published whole, so nothing may ride along)."""
        listed = set(state.files) | {"state.json"}
        return sorted(
            f"unexpected: {rel}"
            for p in root.rglob("*")
            if p.is_file()
            for rel in [p.relative_to(root).as_posix()]
            if rel not in listed
        )

    def kept_state(self, owner: str, partition: str, version: int) -> PartitionState:
        """The recorded state of a kept (archived) version."""
        path = self._internal(owner, "versions", check_partition(partition), f"v{version}", "state.json")
        return PartitionState.from_json(json.loads(path.read_text()))

    def damaged_files(self, owner: str, partition: str, files: list[str]) -> list[str]:
        """Of the committed `files`, those whose bytes are no longer the committed ones."""
        state = self.state(owner, partition)
        return state.problems(self.root, only=files) if state else [f"missing: {f}" for f in files]

    def stale_files(self, owner: str, partition: str, slot_patterns: list[str]) -> list[str]:
        """Files in the partition's slots that the committed state does not list, files it lists
        that are missing, and files whose size or content hash differs from the recorded one."""
        state = self.state(owner, partition)
        listed = set(state.files) if state else set()
        problems = state.problems(self.root) if state else []
        for slot in self.matching_slots(slot_patterns):
            for p in (self.root / slot).rglob("*"):
                if p.is_file() and p.relative_to(self.root).as_posix() not in listed:
                    problems.append(f"unexpected: {p.relative_to(self.root).as_posix()}")
        return sorted(problems)
