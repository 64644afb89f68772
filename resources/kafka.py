import dagster as dg
from pydantic import Field

from replay_defs.sinks import KafkaTopic


class KafkaResource(dg.ConfigurableResource):
    """A Kafka cluster for redrive sinks (confluent-kafka)."""

    bootstrap_servers: str = Field(description="host:port[,host:port] (env EVENT_REPLAY_KAFKA_BOOTSTRAP).")
    message_timeout_ms: int = Field(
        default=30_000, description="How long a message may take to be confirmed before it counts as failed."
    )

    def sink(self, topic: str) -> KafkaTopic:
        return KafkaTopic(self.bootstrap_servers, topic, message_timeout_ms=self.message_timeout_ms)
