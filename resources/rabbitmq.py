import dagster as dg
from pydantic import Field

from replay_defs.core.redact import register_url
from replay_defs.sinks import DEFAULT_MAX_MESSAGE_BYTES, RabbitExchange


class RabbitMQResource(dg.ConfigurableResource):
    """A RabbitMQ broker (pika): redrive sinks, and the exchange processed-events replays publish to."""

    url: str = Field(
        description="AMQP URL, e.g. amqp://user:pass@host:5672/%2F (env EVENT_REPLAY_RABBITMQ_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.url)

    def sink(
        self, exchange: str, routing_key: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> RabbitExchange:
        return RabbitExchange(self.url, exchange, routing_key, max_message_bytes=max_message_bytes)
