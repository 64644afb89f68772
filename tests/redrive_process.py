"""A redrive process for the fault tests: `--messages` synthetic messages of one day, delivered
to a sink through the real delivery loop, ledger and sender — what a redrive run does once it
has selected a day — so a test can freeze the broker under it or SIGKILL it at any point.
Prints the day's counts as one JSON line when it ends.

    python tests/redrive_process.py --sink '{"kind": "kafka", "topic": "t"}' --ledger postgresql://... \
        --pipeline p --day 2025-11-25 --messages 5000 [--chunk-size 100] [--rate 2000] [--force]

The sink's resource is built from the same environment variables the code location reads
(EVENT_REPLAY_KAFKA_BOOTSTRAP, EVENT_REPLAY_SQS_ENDPOINT, EVENT_REPLAY_REDIS_URL, ...)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replay_defs.core.ledger import open_ledger  # noqa: E402
from replay_defs.pipeline import delivery as rd  # noqa: E402
from replay_defs.sinks.base import Batch  # noqa: E402

TYPES = ("click", "view", "purchase")


def message_ids(n: int, prefix: str = "m") -> list[str]:
    return [f"{prefix}{i:07d}" for i in range(n)]


def batches(n: int, day: str, batch_size: int, prefix: str = "m"):
    """The day's messages in `batch_size` batches: id, a JSON body holding it, a type, a key."""
    ids = message_ids(n, prefix)
    for start in range(0, n, batch_size):
        part = ids[start : start + batch_size]
        yield Batch(
            part,
            [json.dumps({"id": m, "day": day, "n": int(m[len(prefix) :])}).encode() for m in part],
            [TYPES[int(m[len(prefix) :]) % 3] for m in part],
        )


def open_sender(spec_json: str):
    fields = json.loads(spec_json)
    # Only the sink's own module (named as its kind), not the registry's every sink: the other
    # sinks' clients cost a second of start-up, paid by every run a fault test starts.
    entry = importlib.import_module(f"replay_defs.sinks.{fields['kind']}").SINK
    assert entry.kind == fields["kind"], f"replay_defs.sinks.{fields['kind']} declares kind {entry.kind!r}"
    spec = entry.spec(**fields)
    settings = {name: os.environ.get(var, default) for name, (var, default) in entry.settings.items()}
    resource = entry.resource(**{k: v for k, v in settings.items() if v is not None})
    return entry.open(resource, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sink", required=True, help="the sink spec as JSON, with its kind")
    p.add_argument("--ledger", required=True, help="the Postgres ledger's URL")
    p.add_argument("--pipeline", default="faults")
    p.add_argument("--day", default="2025-11-25")
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--prefix", default="m", help="message ids are <prefix><7 digits>")
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--backoff", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=None)
    p.add_argument("--run-id", default=f"run-{os.getpid()}")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    sink = open_sender(args.sink)
    try:
        with open_ledger(args.ledger, None) as ledger:
            counts = rd.redrive(
                sink,
                ledger,
                args.pipeline,
                args.day,
                batches(args.messages, args.day, args.batch_size, args.prefix),
                args.run_id,
                force=args.force,
                batch_size=args.batch_size,
                chunk_size=args.chunk_size,
                retries=args.retries,
                retry_backoff_s=args.backoff,
                rate_limit=args.rate,
                log=lambda m: print(m, file=sys.stderr, flush=True),
            )
    finally:
        sink.close()
    print(json.dumps(counts.__dict__), flush=True)


if __name__ == "__main__":
    main()
