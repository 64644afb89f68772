import boto3
from botocore.config import Config
from dagster_aws.utils import ResourceWithBoto3Configuration
from pydantic import Field

from replay_defs.sinks import SqsQueue


class SqsResource(ResourceWithBoto3Configuration):
    """SQS for redrive sinks. dagster-aws has no SQS resource; this uses its boto3 settings
    (region_name, endpoint_url, profile_name, credentials, max_attempts). Env: AWS_* as usual,
    EVENT_REPLAY_SQS_ENDPOINT for a local endpoint."""

    poll_seconds: float = Field(
        default=5.0, description="Backpressure: how often to re-check queue depth while paused."
    )

    def client(self):
        session = boto3.session.Session(profile_name=self.profile_name)
        return session.client(
            "sqs",
            region_name=self.region_name,
            endpoint_url=self.endpoint_url,
            use_ssl=self.use_ssl,
            verify=self.verify,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            config=Config(retries={"max_attempts": self.max_attempts, "mode": "standard"}),
        )

    def sink(self, queue: str, max_visible: int | None = None) -> SqsQueue:
        return SqsQueue(self.client(), queue, max_visible=max_visible, poll_s=self.poll_seconds)
