"""The in-memory twin of the bus, for unit tests: ``MemoryTransport`` builds every part."""

from transports.memory.broker import MemoryBroker, MemoryConsumer, MemoryPublisher
from transports.memory.transport import MemoryTransport

__all__ = ["MemoryBroker", "MemoryConsumer", "MemoryPublisher", "MemoryTransport"]
