"""Bus adapters shared by producers, workers and dlq: one module per transport."""

from transports.base import Consumer, Delivery, DepthProbe, Publisher, QueueDepth, TransportError

__all__ = ["Consumer", "Delivery", "DepthProbe", "Publisher", "QueueDepth", "TransportError"]
