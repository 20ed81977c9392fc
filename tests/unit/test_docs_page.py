"""/docs and /redoc serve Swagger UI and ReDoc from the package, never from a CDN."""

import asyncio
import re

import httpx
from fastapi import FastAPI

from api.app import install_docs


def test_the_docs_pages_reference_no_external_host_and_their_assets_answer():
    app = FastAPI(docs_url=None, redoc_url=None)
    install_docs(app)

    async def check():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://edge") as client:
            for page in ("/docs", "/redoc"):
                r = await client.get(page)
                assert r.status_code == 200
                assert "http://" not in r.text and "https://" not in r.text, r.text
                assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
                assert len(assets) >= 2, assets
                for url in assets:
                    assert url.startswith("/") and not url.startswith("//"), url
                    got = await client.get(url)
                    assert got.status_code == 200 and len(got.content) > 100, url

    asyncio.run(check())
