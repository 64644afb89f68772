import dagster as dg
from pydantic import Field

from replay_defs.sinks import Outbox


class OutboxResource(dg.ConfigurableResource):
    """The default redrive sink: JSONL files in a directory a consumer can tail."""

    root: str = Field(description="Outbox directory (env EVENT_REPLAY_OUTBOX).")

    def get(self) -> Outbox:
        return Outbox(self.root)
