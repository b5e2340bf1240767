"""The status port's routes: health, status and the peer table, as JSON."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from node.http import HttpApp, HttpError, Request, Response, json_response, start_http
from protocol.cid import is_content_id

if TYPE_CHECKING:
    from node.daemon import Node


class StatusApi:
    """Routes over a running Node; each later concern adds its routes through ``app``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.app = HttpApp(token=node.config.status.token)
        self.url: str | None = None
        self._server: Any = None
        self.app.route("GET", "/healthz", self.healthz, summary="Liveness: 200 while libp2p runs")
        self.app.route("GET", "/status", self.status, summary="This peer, its swarm and its counters")
        self.app.route("GET", "/peers", self.peers, summary="The peer table with liveness")
        self.app.route("GET", "/exchange", self.exchange, summary="Chunk exchange counters and fetches")
        self.app.route("GET", "/fetches", self.fetches, summary="Fetches with their progress")
        self.app.route("POST", "/fetches", self.start_fetch, summary="Fetch an artifact by manifest id", mutating=True)
        self.app.route(
            "DELETE", "/fetches/{id}", self.cancel_fetch, summary="Cancel an in-flight fetch", mutating=True
        )

    async def start(self, host: str, port: int) -> None:
        self._server = await start_http(self.app, host, port)
        self.url = f"http://{host}:{self._server.port}"

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def healthz(self, request: Request) -> Response:
        bridge = self.node.bridge
        ok = bridge is not None and bridge.done is not None and not bridge.done.done()
        return json_response({"ok": ok}, status=200 if ok else 503)

    async def status(self, request: Request) -> Response:
        node = self.node
        assert node.key is not None and node.bridge is not None and node.gossip is not None
        membership = node.membership
        table = membership.table if membership else None
        live = table.live() if table else []
        body: dict[str, Any] = {
            "peer_id": node.key.peer_id,
            "name": node.config.node.name or node.key.peer_id[-8:],
            "swarm": node.config.swarm.name,
            "addrs": node.bridge.listen_addrs(),
            "uptime_s": round(time.time() - node.started_at, 1),
            "peers": {
                "live": len(live),
                "dead": len(table.peers) - len(live) if table else 0,
                "connected": len(node.bridge.connected_peers()),
            },
            "gossip": node.gossip.stats(),
            "rejected": dict(node.gossip.rejected),
            "heartbeats_sent": membership.heartbeats_sent if membership else 0,
            "exchange": node.exchange.stats.view() if node.exchange else None,
        }
        return json_response(body)

    async def peers(self, request: Request) -> Response:
        membership = self.node.membership
        return json_response({"peers": membership.peers_view() if membership else []})

    async def exchange(self, request: Request) -> Response:
        assert self.node.exchange is not None
        return json_response(self.node.exchange.view())

    async def fetches(self, request: Request) -> Response:
        assert self.node.exchange is not None
        return json_response({"fetches": [p.view() for p in self.node.exchange.fetches.values()]})

    async def start_fetch(self, request: Request) -> Response:
        assert self.node.exchange is not None
        body = request.json()
        manifest_id = body.get("manifest") if isinstance(body, dict) else None
        if not is_content_id(manifest_id):
            raise HttpError(400, "body must be {\"manifest\": \"b3:...\"}")
        self.node.exchange.start_fetch(manifest_id)
        progress = self.node.exchange.fetches.get(manifest_id)
        return json_response(progress.view() if progress else {"manifest_id": manifest_id}, status=202)

    async def cancel_fetch(self, request: Request) -> Response:
        assert self.node.exchange is not None
        manifest_id = request.params["id"]
        if not self.node.exchange.cancel(manifest_id):
            raise HttpError(404, "no fetch in flight for that id")
        return json_response({"cancelled": manifest_id})
