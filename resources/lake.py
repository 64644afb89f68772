import dagster as dg
from pydantic import Field

from replay_defs.core.lake import Lake
from replay_defs.core.storage import S3Settings
from replay_defs.deployment import LAKE, deployed_path


class LakeResource(dg.ConfigurableResource):
    """The lake: a local directory (the embedded default) or s3://bucket/prefix, its day outputs
    as Delta Lake tables. S3 is reached with the settings of the code location's dagster-aws
    `S3Resource` (endpoint and region; the same variables), credentials from the AWS chain, never
    the URL."""

    root: str = Field(description="Lake root: a directory or s3://bucket/prefix (env EVENT_REPLAY_LAKE).")
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint, e.g. MinIO (env EVENT_REPLAY_S3_ENDPOINT)."
    )
    region: str = Field(default="us-east-1", description="S3 region (env AWS_REGION).")
    retention_hours: int = Field(
        default=168,
        ge=0,
        description="How long replaced versions stay restorable: `event-replay vacuum` deletes older files "
        "(env EVENT_REPLAY_LAKE_RETENTION_HOURS).",
    )

    def get(self) -> Lake:
        settings = S3Settings(endpoint_url=self.s3_endpoint_url, region=self.region)
        return Lake(deployed_path(self.root, LAKE), settings, retention_hours=self.retention_hours)
