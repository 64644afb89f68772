"""One ConfigurableResource per external system that is not a sink. Settings come from env vars
(see README). A sink's resource lives in its module under `replay_defs/sinks/` (e.g.
`replay_defs.sinks.kafka.KafkaResource`), and the code location builds it from the registry."""

from resources.aws import Boto3Resource, S3Resource
from resources.clickhouse import ClickHouseResource
from resources.lake import LakeResource
from resources.ledger import LedgerResource
from resources.postgres import PostgresResource
from resources.projection_replay import ProjectionReplayResource
from resources.store import StoreResource

__all__ = [
    "Boto3Resource",
    "ClickHouseResource",
    "LakeResource",
    "LedgerResource",
    "PostgresResource",
    "ProjectionReplayResource",
    "S3Resource",
    "StoreResource",
]
