"""Where the lake's bytes live: a local directory (the embedded default) or `s3://bucket/prefix`.

One interface over both, through pyarrow's filesystems, so the lake, the raw-file listing and the
parser never ask which one they have. Paths are lake-relative (`raw/.../x.gz`) and checked so none
can leave the root. S3 credentials come from the standard AWS chain (environment, profile, instance
role) or the S3 settings, never from the URL: `s3://key:secret@bucket` is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import pyarrow.fs as pafs

_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+%-]*$")
HASH_CHUNK = 8 << 20


def check_rel(rel: str) -> str:
    """A lake-relative path: plain parts only (no `..`, no absolute path, no empty part)."""
    parts = rel.split("/")
    if not rel or any(not _PART.fullmatch(p) or p in (".", "..") for p in parts):
        raise ValueError(f"{rel!r} is not a safe lake-relative path")
    return rel


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 (or an S3-compatible store such as MinIO or moto). Credentials left empty
    come from the standard AWS chain."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None

    @classmethod
    def from_env(cls) -> S3Settings:
        return cls(
            endpoint_url=os.environ.get("EVENT_REPLAY_S3_ENDPOINT") or None,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


@dataclass(frozen=True)
class FileInfo:
    rel: str
    size: int
    mtime_ns: int


class Storage:
    """The lake root: `root` is a local directory or `s3://bucket/prefix`."""

    def __init__(self, root: str | os.PathLike, s3: S3Settings | None = None):
        root = str(root)
        self.s3 = s3 or S3Settings.from_env()
        if root.startswith("s3://"):
            url = urlparse(root)
            if url.username or url.password or "@" in url.netloc:
                raise ValueError("the lake URL must not hold credentials: set them in the AWS environment or profile")
            if not url.netloc:
                raise ValueError(f"{root!r} names no bucket")
            self.bucket, self.prefix = url.netloc, url.path.strip("/")
            self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
            self.base = f"{self.bucket}/{self.prefix}".rstrip("/")
            self.fs = self._s3_filesystem()
            self.is_local = False
        else:
            self.root = str(Path(root).resolve())
            self.base = self.root
            self.bucket, self.prefix = Path(self.root).name, ""
            self.fs = pafs.LocalFileSystem()
            self.is_local = True

    def _s3_filesystem(self) -> pafs.S3FileSystem:
        s = self.s3
        kw: dict = {"region": s.region or "us-east-1"}
        if s.endpoint_url:
            ep = urlparse(s.endpoint_url)
            kw.update(endpoint_override=ep.netloc, scheme=ep.scheme or "https")
        if s.access_key_id:
            kw.update(access_key=s.access_key_id, secret_key=s.secret_access_key, session_token=s.session_token)
        return pafs.S3FileSystem(**kw)

    def delta_options(self) -> dict[str, str]:
        """deltalake's storage options for this root (none for a local directory). Credentials
        are passed only when the settings hold them; otherwise deltalake reads the AWS chain too."""
        if self.is_local:
            return {}
        s = self.s3
        opts = {"AWS_REGION": s.region or "us-east-1"}
        if s.endpoint_url:
            opts["AWS_ENDPOINT_URL"] = s.endpoint_url
            if s.endpoint_url.startswith("http://"):
                opts["AWS_ALLOW_HTTP"] = "true"
        if s.access_key_id:
            opts.update(AWS_ACCESS_KEY_ID=s.access_key_id, AWS_SECRET_ACCESS_KEY=s.secret_access_key or "")
            if s.session_token:
                opts["AWS_SESSION_TOKEN"] = s.session_token
        return opts

    # ---- names ---------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """The path of a lake-relative file in `self.fs`."""
        return f"{self.base}/{check_rel(rel)}"

    def uri(self, rel: str) -> str:
        """A URI for a lake-relative path (`file:///…` or `s3://bucket/prefix/…`); keeps the `=`
        of hive-style paths readable."""
        if self.is_local:
            return "file://" + quote(f"{self.root}/{rel}", safe="/=-_.~")
        return f"{self.root}/{quote(rel, safe='/=-_.~')}"

    def rel_from_uri(self, uri: str) -> str:
        """Inverse of `uri`; refuses anything outside the lake."""
        prefix = self.uri("").rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri!r} is not inside the lake at {self.root}")
        rel = unquote(uri[len(prefix) :])
        if any(part in ("", ".", "..") for part in rel.split("/")):
            raise ValueError(f"{uri!r} escapes the lake or is not a plain path")
        return rel

    def bucket_key(self, rel: str) -> tuple[str, str]:
        """(bucket, key) of a lake file, as S3 names it; a local lake's "bucket" is its directory name."""
        return self.bucket, f"{self.prefix}/{rel}" if self.prefix else rel

    def reader_path(self, rel: str) -> str:
        """What a reader in another process opens with `open_binary`: a local path or an s3:// URI."""
        return self.path(rel) if self.is_local else f"{self.root}/{check_rel(rel)}"

    def table_uri(self, rel: str) -> str:
        """Where deltalake finds the table at `rel`."""
        return f"{self.root}/{check_rel(rel)}"

    # ---- reading ---------------------------------------------------------------------------------
    def list_files(self, rel_dir: str) -> list[FileInfo]:
        """Files directly in a lake directory (none when it does not exist)."""
        sel = pafs.FileSelector(self.path(rel_dir), allow_not_found=True, recursive=False)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                rel = f"{rel_dir}/{info.base_name}"
                out.append(FileInfo(rel, info.size, info.mtime_ns or 0))
        return sorted(out, key=lambda f: f.rel)

    def list_dirs(self, rel_dir: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel_dir), allow_not_found=True, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory)

    def info(self, rel: str) -> FileInfo | None:
        i = self.fs.get_file_info(self.path(rel))
        return FileInfo(rel, i.size, i.mtime_ns or 0) if i.type == pafs.FileType.File else None

    def open(self, rel: str):
        """A binary stream of a lake file (seekable for Parquet readers)."""
        return self.fs.open_input_file(self.path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel), compression=None) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(rel), compression=None) as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    # ---- writing ---------------------------------------------------------------------------------
    def writable(self, rel: str) -> str:
        """The local path of `rel`, if writing there stays inside the lake once symlinks are
        followed: they are followed for reading (raw data linked in), never for writing."""
        path = self.path(rel)
        if self.is_local and not Path(path).resolve().is_relative_to(self.root):
            raise ValueError(
                f"{path} leads outside the lake at {self.root} (through a symlink): refusing to write there"
            )
        return path

    def write_bytes(self, rel: str, data: bytes) -> None:
        """All or nothing: a local file is written to a temp name and renamed; an S3 PUT is atomic."""
        path = self.writable(rel)
        if not self.is_local:
            # compression=None: pyarrow would otherwise gzip a `.gz` name's bytes once more.
            with self.fs.open_output_stream(path, compression=None) as f:
                f.write(data)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def put_file(self, local: str | os.PathLike, rel: str, move: bool = False) -> None:
        """Copy a local file into the lake (`move`: rename it there when the lake is local)."""
        dest = self.writable(rel)
        if self.is_local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            if move:
                os.replace(local, dest)
                return
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass


def open_binary(path: str):
    """A local path, or an `s3://` URI (with the S3 settings of the environment, as in a parse
    worker process), opened for reading."""
    if path.startswith("s3://"):
        storage = Storage(path.rsplit("/", 1)[0])
        return storage.fs.open_input_stream(f"{storage.base}/{path.rsplit('/', 1)[1]}", compression=None)
    return open(path, "rb")
