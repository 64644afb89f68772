import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from replay_defs.core.lake import Lake
from replay_defs.core.storage import S3Settings
from replay_defs.deployment import LAKE, deployed_path


class LakeResource(dg.ConfigurableResource):
    """The lake: a local directory (the embedded default) or s3://bucket/prefix, its day outputs
    as Delta Lake tables. How S3 is reached is dagster-aws's `S3Resource` (the code location's
    `s3`): endpoint, region, and credentials when set there, else the AWS chain; never the URL."""

    root: str = Field(description="Lake root: a directory or s3://bucket/prefix (env EVENT_REPLAY_LAKE).")
    s3: S3Resource  # how to reach S3 when the lake is there
    retention_hours: int = Field(
        default=168,
        ge=0,
        description="How long replaced versions stay restorable: `event-replay vacuum` deletes older files "
        "(env EVENT_REPLAY_LAKE_RETENTION_HOURS).",
    )

    def get(self) -> Lake:
        s3 = self.s3
        settings = S3Settings(
            endpoint_url=s3.endpoint_url,
            region=s3.region_name or "us-east-1",
            access_key_id=s3.aws_access_key_id,
            secret_access_key=s3.aws_secret_access_key,
            session_token=s3.aws_session_token,
        )
        return Lake(deployed_path(self.root, LAKE), settings, retention_hours=self.retention_hours)
