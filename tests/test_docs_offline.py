"""`/docs` works without the internet: Swagger UI's assets are served by the API itself."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from jobstore.store import JobStore
from producers.app import ApiConfig, ApiDeps, create_app
from transports.memory import MemoryBroker, MemoryPublisher


async def test_docs_page_and_every_asset_it_loads_come_from_the_api(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    app = create_app(
        ApiDeps(
            store=store,
            publisher=MemoryPublisher(MemoryBroker()),
            models=lambda: [],
            config=ApiConfig(topic="jobs"),
            registry=CollectorRegistry(),
        )
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        page = await client.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
        assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
        assert assets, page.text
        for url in assets:
            assert url.startswith("/"), f"{url} is not served by the API (a CDN?)"
            r = await client.get(url)
            assert r.status_code == 200 and len(r.content) > 100, url
        assert "/openapi.json" in page.text
    store.close()
