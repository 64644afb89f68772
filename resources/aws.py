"""boto3 clients for S3 and SQS, configured as dagster-aws's resources are (the same field names).

Not dagster-aws itself: importing any of it imports its whole package (every component, and
dagster's components and test utilities), about 0.85 CPU-s more for every process that loads the
code location (each CLI call, run worker, code server and sensor tick), where these few fields
are all we use."""

import boto3
import dagster as dg
from botocore.config import Config
from pydantic import Field


class Boto3Resource(dg.ConfigurableResource):
    """A boto3 session's settings (as dagster-aws's `ResourceWithBoto3Configuration`); unset ones
    come from boto3's own chain (AWS_* env vars, ~/.aws, instance roles)."""

    region_name: str | None = Field(default=None, description="The region of the boto3 session (env AWS_REGION).")
    max_attempts: int = Field(
        default=5, description="boto3's retry handler: attempts per call, the first one included."
    )
    profile_name: str | None = Field(default=None, description="A profile of ~/.aws to take the session from.")
    use_ssl: bool = Field(default=True, description="Whether to use SSL.")
    endpoint_url: str | None = Field(default=None, description="A custom endpoint (MinIO, moto, LocalStack).")
    verify: bool | None = Field(default=True, description="Whether to verify SSL certificates.")
    aws_access_key_id: str | None = Field(default=None, description="An access key id, else boto3's chain.")
    aws_secret_access_key: str | None = Field(
        default=None, description="Its secret access key.", json_schema_extra={"dagster__is_secret": True}
    )
    aws_session_token: str | None = Field(
        default=None, description="A session token.", json_schema_extra={"dagster__is_secret": True}
    )

    def boto3_client(self, service: str, config: Config | None = None):
        session = boto3.session.Session(profile_name=self.profile_name)
        return session.client(
            service,
            region_name=self.region_name,
            endpoint_url=self.endpoint_url,
            use_ssl=self.use_ssl,
            verify=self.verify,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            config=config or Config(retries={"max_attempts": self.max_attempts, "mode": "standard"}),
        )


class S3Resource(Boto3Resource):
    """S3: the lake when it is on S3, and refill sources there (env EVENT_REPLAY_S3_ENDPOINT for a
    local endpoint)."""

    def get_client(self):
        return self.boto3_client("s3")
