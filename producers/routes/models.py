"""`/v1/models`: the models this service runs, their versions, input contracts and the
execution providers the workers loaded them on."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from producers.openapi import input_schema
from producers.state import State
from schemas.contracts import resolve_version
from schemas.jobs import ModelInfo, ModelList


def models_router() -> APIRouter:
    router = APIRouter(tags=["models"])

    @router.get("/v1/models", response_model=ModelList)
    async def list_models(st: State) -> ModelList:
        providers = await asyncio.to_thread(st.deps.store.providers)
        data = []
        for c in sorted(st.deps.models(), key=lambda c: (c.name, c.version)):
            data.append(
                ModelInfo(
                    name=c.name,
                    version=c.version,
                    default=resolve_version(st.deps.models(), c.name, None) == c,
                    adapter=c.adapter,
                    max_batch_size=c.max_batch_size,
                    max_wait_ms=c.max_wait_ms,
                    input_schema=input_schema(c.adapter),
                    providers=sorted(providers.get(c.key, set())),
                )
            )
        return ModelList(data=data)

    return router
