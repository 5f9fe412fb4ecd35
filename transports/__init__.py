"""Bus adapters shared by producers, workers and dlq: one package per transport (``kafka/``,
``sqs/``, ``memory/``), each exporting one object that satisfies ``transports.transport``'s
``Transport``; the ports they build are in ``transports.base``."""

from transports.base import Consumer, Delivery, DepthProbe, Publisher, QueueDepth, TransportError

__all__ = ["Consumer", "Delivery", "DepthProbe", "Publisher", "QueueDepth", "TransportError"]
