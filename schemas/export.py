"""Write the JSON Schema of every wire model to ``schemas/json/``.

``python -m schemas.export`` rewrites the files; a test fails when they drift from the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.batch import BatchRequest, BatchResponse
from schemas.contracts import ModelConfig, TensorInput, TextEmbeddingInput
from schemas.dlq import DeadLetterPage, RedriveRequest, RedriveResult
from schemas.envelope import JobEnvelope
from schemas.errors import ErrorResponse
from schemas.events import JobEventMessage
from schemas.jobs import AutoscaleResource, JobPage, JobRequest, JobResource, ModelList
from schemas.webhooks import WebhookDeliveryList, WebhookPayload

EXPORTED: dict[str, type[BaseModel]] = {
    "job-request": JobRequest,
    "job-resource": JobResource,
    "job-page": JobPage,
    "job-batch-request": BatchRequest,
    "job-batch-response": BatchResponse,
    "job-envelope": JobEnvelope,
    "job-event": JobEventMessage,
    "error-response": ErrorResponse,
    "model-list": ModelList,
    "model-config": ModelConfig,
    "input-text-embedding": TextEmbeddingInput,
    "input-identity": TensorInput,
    "dead-letter-page": DeadLetterPage,
    "redrive-request": RedriveRequest,
    "redrive-result": RedriveResult,
    "autoscale": AutoscaleResource,
    "webhook-payload": WebhookPayload,
    "webhook-delivery-list": WebhookDeliveryList,
}

JSON_DIR = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, model in EXPORTED.items():
        doc: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://inferq.dev/schemas/{name}.json",
            **model.model_json_schema(),
        }
        out[f"{name}.json"] = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return out


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for filename, text in render().items():
        (JSON_DIR / filename).write_text(text)
    print(f"wrote {len(EXPORTED)} schemas to {JSON_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
