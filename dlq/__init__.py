"""Dead-letter routing with reasons (list, inspect, redrive and purge come later)."""

from dlq.router import DeadLetter, DeadLetterRouter, reason_from_headers

__all__ = ["DeadLetter", "DeadLetterRouter", "reason_from_headers"]
