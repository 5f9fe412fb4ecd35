"""The OpenAPI document as this app answers, not only as FastAPI infers it: the error shape
of its 422 and 415 answers, and what a submit must hold as of each fetch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from schemas.contracts import ADAPTER_INPUTS, ModelConfig

ERROR_REF = "#/components/schemas/ErrorResponse"
NOT_JSON = {
    "description": "The body was not sent as JSON: Content-Type must be `application/json` "
    "(`unsupported_media_type`)",
    "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
}


def input_schema(adapter: str) -> dict[str, Any]:
    """The JSON Schema of an adapter's input contract."""
    return ADAPTER_INPUTS[adapter].model_json_schema()


def document_models(
    app: FastAPI, models: Callable[[], list[ModelConfig]], *, inline_only: bool
) -> None:
    """The OpenAPI document states what a submit must hold, as of each fetch: the known
    model names and versions, each model's input contract, and exactly one of ``input``
    and ``input_url`` (only ``input`` without a claim-check store)."""
    generate = app.openapi  # FastAPI's own, which caches the static part

    def openapi() -> dict[str, Any]:
        doc = copy.deepcopy(generate())
        _error_shape_for_422(doc)
        _not_json_is_415(doc)
        configs = models()
        request = doc.get("components", {}).get("schemas", {}).get("JobRequest")
        if request is None:  # no submit route (never in this app; keeps the doc servable)
            return doc
        props = request["properties"]
        if configs:
            props["model"]["enum"] = sorted({c.name for c in configs})
            by_contract: dict[tuple[str, str], list[str]] = {}
            for c in configs:
                by_contract.setdefault((c.name, c.adapter), []).append(c.version)
            request["anyOf"] = [
                {
                    "properties": {
                        "model": {"const": name},
                        "version": {"anyOf": [{"enum": sorted(versions)}, {"type": "null"}]},
                        "input": {"anyOf": [input_schema(adapter), {"type": "null"}]},
                    }
                }
                for (name, adapter), versions in sorted(by_contract.items())
            ]
        if inline_only:  # no claim-check store: input_url is refused, input is required
            props.pop("input_url", None)
            request["required"] = sorted({*request.get("required", []), "input"})
            props["input"] = {k: v for k, v in props["input"].items() if k != "anyOf"} | {
                "type": "object"
            }
        else:
            request["oneOf"] = [
                {"required": ["input"], "properties": {"input": {"type": "object"}}},
                {"required": ["input_url"], "properties": {"input_url": {"type": "string"}}},
            ]
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _error_shape_for_422(doc: dict[str, Any]) -> None:
    """FastAPI documents its own 422 body ({"detail": ...}); this app answers ErrorResponse."""
    schemas = doc.get("components", {}).get("schemas", {})
    if "ErrorResponse" not in schemas:
        return
    for operation in _operations(doc):
        answer = operation.get("responses", {}).get("422", {})
        media = answer.get("content", {}).get("application/json", {})
        if media.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
            media["schema"] = {"$ref": ERROR_REF}
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def _not_json_is_415(doc: dict[str, Any]) -> None:
    """Every operation that takes a JSON body answers 415 to one sent as anything else
    (``producers.errors``), whichever package's router it comes from."""
    if "ErrorResponse" not in doc.get("components", {}).get("schemas", {}):
        return
    for operation in _operations(doc):
        if "application/json" in operation.get("requestBody", {}).get("content", {}):
            operation.setdefault("responses", {}).setdefault("415", copy.deepcopy(NOT_JSON))


def _operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for item in doc.get("paths", {}).values() for op in item.values()]
