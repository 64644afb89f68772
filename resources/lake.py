import dagster as dg
from pydantic import Field

from replay_defs.core.lake import Lake
from replay_defs.deployment import LAKE, deployed_path


class LakeResource(dg.ConfigurableResource):
    """The lake: a local directory on the embedded default."""

    root: str = Field(description="Lake root directory (env EVENT_REPLAY_LAKE).")
    keep_versions: int = Field(default=2, description="Prior versions kept per partition for rollback.")

    def get(self) -> Lake:
        return Lake(deployed_path(self.root, LAKE), keep_versions=self.keep_versions)
