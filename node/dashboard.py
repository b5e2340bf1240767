"""The dashboard page on the status port: static files shipped in node/static, and the chain they plot."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import TYPE_CHECKING, Any

from node.http import HttpError, Request, Response, json_response

if TYPE_CHECKING:
    from node.status_api import StatusApi

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page loads nothing from elsewhere, and the browser is told to hold it to that.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-cache"),
)
CHAIN_LIMIT = 10_000


def static_files() -> dict[str, Any]:
    """The files the dashboard may serve, by name; nothing else under the package is reachable."""
    folder = resources.files("node") / "static"
    return {
        entry.name: entry
        for entry in folder.iterdir()
        if entry.is_file() and any(entry.name.endswith(suffix) for suffix in CONTENT_TYPES)
    }


class Dashboard:
    """``GET /``, ``GET /static/{name}`` and ``GET /chain`` (the canonical chain the page plots)."""

    def __init__(self, api: StatusApi) -> None:
        self.api = api
        self.files = static_files()

    async def index(self, request: Request) -> Response:
        return await self._serve("index.html")

    async def asset(self, request: Request) -> Response:
        return await self._serve(request.params["name"])

    async def _serve(self, name: str) -> Response:
        entry = self.files.get(name)
        if entry is None:
            raise HttpError(404, "not found")
        suffix = name[name.rfind("."):]
        body = await asyncio.to_thread(entry.read_bytes)
        return Response(body, 200, CONTENT_TYPES[suffix], SECURITY_HEADERS)

    async def chain(self, request: Request) -> Response:
        limit = request.args["limit"]
        if not 1 <= limit <= CHAIN_LIMIT:
            raise HttpError(400, f"limit must be between 1 and {CHAIN_LIMIT}")
        heads = self.api._heads()
        rows: list[dict[str, Any]] = []
        for head in heads.index.ancestors(heads.adopted):
            if len(rows) == limit:
                break
            rows.append(self.api._head_row(head))
        return json_response({"canonical": heads.adopted, "chain": rows[::-1]})
