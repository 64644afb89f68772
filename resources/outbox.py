import dagster as dg
from pydantic import Field

from replay_defs.sinks import Outbox
from resources.deployment import OUTBOX, deployed_path


class OutboxResource(dg.ConfigurableResource):
    """The default redrive sink: JSONL files in a directory a consumer can tail."""

    root: str = Field(description="Outbox directory (env EVENT_REPLAY_OUTBOX).")

    def get(self) -> Outbox:
        return Outbox(deployed_path(self.root, OUTBOX))
