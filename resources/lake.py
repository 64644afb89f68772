import dagster as dg
from pydantic import Field

from replay_defs.core.lake import Lake
from replay_defs.core.storage import S3Settings
from replay_defs.deployment import LAKE, deployed_path


class LakeResource(dg.ConfigurableResource):
    """The lake: a local directory (the embedded default) or s3://bucket/prefix, its day outputs
    as Delta Lake tables. S3 credentials come from the AWS environment or profile, never the URL."""

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
        return Lake(
            deployed_path(self.root, LAKE),
            S3Settings(endpoint_url=self.s3_endpoint_url, region=self.region),
            retention_hours=self.retention_hours,
        )
