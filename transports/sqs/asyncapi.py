"""The AsyncAPI document of the SQS bus, which FastStream has no broker for: written from the
same envelope schema."""

from __future__ import annotations

from typing import Any

from schemas.envelope import JobEnvelope


def sqs_asyncapi_document(queue: str, dlq_queue: str, endpoint: str | None) -> dict[str, Any]:
    """AsyncAPI 3.0 for the SQS transport: the jobs queue (structured CloudEvents in the body)
    and its dead-letter queue, with the envelope's JSON Schema as the message payload."""
    schemas = JobEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = dict(schemas.pop("$defs", {}))
    components["JobEnvelope"] = schemas
    jobs, dead = "jobs", "dead_letters"
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "inferq bus",
            "version": "1.0.0",
            "description": "The job queues of inferq on Amazon SQS.",
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "sqs": {
                "host": endpoint or "sqs.<region>.amazonaws.com",
                "protocol": "sqs",
                "description": "Amazon SQS (or an SQS-compatible endpoint)",
            }
        },
        "channels": {
            jobs: {
                "address": queue,
                "description": (
                    "Job requests: structured CloudEvents 1.0 of type inferq.job.requested as "
                    "the message body. Services may send here directly; the event id is the "
                    "job id (and, on FIFO queues, the deduplication id)."
                ),
                "messages": {"JobEnvelope": {"$ref": "#/components/messages/JobEnvelope"}},
                "bindings": {"sqs": {"queue": {"name": queue}, "bindingVersion": "0.2.0"}},
            },
            dead: {
                "address": dlq_queue,
                "description": (
                    "Dead letters: the original body, with inferq-dlq-* message attributes "
                    "giving the reason; also the target of the queue's RedrivePolicy."
                ),
                "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
                "bindings": {"sqs": {"queue": {"name": dlq_queue}, "bindingVersion": "0.2.0"}},
            },
        },
        "operations": {
            "submit": {
                "action": "send",
                "channel": {"$ref": f"#/channels/{jobs}"},
                "summary": "Publish a job request (the API does, and so may any service).",
            },
            "consume": {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{jobs}"},
                "summary": "Worker pools receive job requests (long polling, 10 at a time).",
            },
            "dead_letter": {
                "action": "send",
                "channel": {"$ref": f"#/channels/{dead}"},
                "summary": "Messages that cannot be processed, with their reason.",
            },
        },
        "components": {
            "messages": {
                "JobEnvelope": {
                    "contentType": "application/cloudevents+json",
                    "payload": {"$ref": "#/components/schemas/JobEnvelope"},
                },
                "DeadLetter": {"contentType": "application/octet-stream"},
            },
            "schemas": components,
        },
    }
