"""The AsyncAPI document of the SQS bus, which FastStream has no broker for: written from the
same envelope schema."""

from __future__ import annotations

from typing import Any

from schemas.envelope import JobEnvelope
from schemas.jobs import JobResource

_EVENTS = (
    "Job events on an SNS topic that users subscribe their own queues to: every state change "
    "of a job, published after it is stored, as a CloudEvent 1.0 in binary mode. The "
    "message is the job resource as GET /v1/jobs/{id} showed it then (result_url where the "
    "result was offloaded to S3); String message attributes ce_type "
    "(inferq.job.started, inferq.job.succeeded, inferq.job.failed, inferq.job.cancelled, "
    "inferq.job.expired), ce_subject (the job id), ce_id "
    "(`<job id>:<seq>`, unique per event: deduplicate by it), ce_source, ce_time. Subscribe "
    "with RawMessageDelivery=true to get them as the SQS message's own attributes."
)


def sqs_asyncapi_document(
    queue: str, dlq_queue: str, endpoint: str | None, *, events: str | None = None
) -> dict[str, Any]:
    """AsyncAPI 3.0 for the SQS transport: the jobs queue (structured CloudEvents in the body),
    its dead-letter queue, with the envelope's JSON Schema as the message payload, and the
    SNS topic of job events."""
    schemas = JobEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = dict(schemas.pop("$defs", {}))
    components["JobEnvelope"] = schemas
    resource = JobResource.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(resource.pop("$defs", {}))
    components["JobResource"] = resource
    jobs, dead = "jobs", "dead_letters"
    doc = _document(queue, dlq_queue, endpoint, components, jobs, dead)
    if events is not None:
        doc["channels"]["job_events"] = {
            "address": events,
            "description": _EVENTS,
            "messages": {"JobEvent": {"$ref": "#/components/messages/JobEvent"}},
            "bindings": {"sns": {"name": events, "bindingVersion": "0.1.0"}},
        }
        doc["operations"]["job_events"] = {
            "action": "send",
            "channel": {"$ref": "#/channels/job_events"},
            "summary": "inferq publishes each stored state change of a job.",
        }
        doc["components"]["messages"]["JobEvent"] = {
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/JobResource"},
        }
    return doc


def _document(
    queue: str,
    dlq_queue: str,
    endpoint: str | None,
    components: dict[str, Any],
    jobs: str,
    dead: str,
) -> dict[str, Any]:
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
