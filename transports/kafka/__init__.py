"""The Kafka transport on aiokafka: ``KafkaTransport`` builds every part of it."""

from transports.kafka.admin import ensure_topics
from transports.kafka.config import KafkaConfig
from transports.kafka.consumer import KafkaConsumer
from transports.kafka.depth import KafkaDepth
from transports.kafka.local import EmbeddedKafka
from transports.kafka.publisher import KafkaPublisher, Outgoing
from transports.kafka.transport import KafkaTransport

__all__ = [
    "EmbeddedKafka",
    "KafkaConfig",
    "KafkaConsumer",
    "KafkaDepth",
    "KafkaPublisher",
    "KafkaTransport",
    "Outgoing",
    "ensure_topics",
]
