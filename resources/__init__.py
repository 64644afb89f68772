"""One ConfigurableResource per external system. Settings come from env vars (see README)."""

from resources.clickhouse import ClickHouseResource
from resources.kafka import KafkaResource
from resources.lake import LakeResource
from resources.ledger import LedgerResource
from resources.outbox import OutboxResource
from resources.postgres import PostgresResource
from resources.projection_replay import ProjectionReplayResource
from resources.rabbitmq import RabbitMQResource
from resources.redis import RedisResource
from resources.sqs import SqsResource
from resources.store import StoreResource

__all__ = [
    "ClickHouseResource",
    "KafkaResource",
    "LakeResource",
    "LedgerResource",
    "OutboxResource",
    "PostgresResource",
    "ProjectionReplayResource",
    "RabbitMQResource",
    "RedisResource",
    "SqsResource",
    "StoreResource",
]
