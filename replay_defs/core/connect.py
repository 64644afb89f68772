"""Every connection to PostgreSQL, RabbitMQ and Redis is opened here: the URL's secrets are
registered for masking (`redact.register_url`) first, and a failed connect leaves with them masked
(same exception type, so callers catch what they caught before). ClickHouse goes through
`replay_defs.core.clickhouse.ClickHouse`, which does the same."""

from __future__ import annotations

from replay_defs.core.redact import mask_logs, register_url, secrets_masked


def postgres(url: str, **kwargs):
    """`psycopg.connect(url, **kwargs)` (a URL or a libpq conninfo)."""
    import psycopg

    with secrets_masked(url):
        return psycopg.connect(url, **kwargs)


def rabbitmq(url: str, **params):
    """A `pika.BlockingConnection` to `url`; `params` set attributes of its URLParameters
    (connection_attempts, socket_timeout, ...)."""
    import pika

    mask_logs("pika")  # it logs a failed connect (with the broker's "vhost guest:PW@... not found") before raising it
    with secrets_masked(url):
        p = pika.URLParameters(url)
        for k, v in params.items():
            setattr(p, k, v)
        return pika.BlockingConnection(p)


def redis(url: str, **kwargs):
    """`redis.Redis.from_url(url, **kwargs)` (it connects on the first command; its errors are
    masked where they are caught, through `redact`)."""
    import redis as redis_py

    with secrets_masked(url):
        return redis_py.Redis.from_url(url, **kwargs)


def redis_async(url: str, **kwargs):
    """`redis.asyncio.Redis.from_url(url, **kwargs)`."""
    import redis.asyncio

    with secrets_masked(url):
        return redis.asyncio.Redis.from_url(url, **kwargs)


__all__ = ["postgres", "rabbitmq", "redis", "redis_async", "register_url"]
