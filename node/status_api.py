"""The status port's routes: health, status, peers, heads, leases and the exchange, as JSON."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from node.artifacts import MissingContent, materialise_safetensors
from node.http import (
    Event,
    EventStream,
    HttpApp,
    HttpError,
    Param,
    Request,
    Response,
    file_response,
    json_response,
    start_http,
)
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
        self.app.route("GET", "/heads", self.heads, summary="Recent heads, the canonical one marked")
        self.app.route("GET", "/heads/{id}", self.head, summary="One head record")
        self.app.route("GET", "/heads/{id}/weights", self.head_weights, summary="A head's weights as safetensors")
        self.app.route("GET", "/leases", self.leases, summary="Own and observed leases, epoch coverage")
        self.app.route(
            "GET", "/events", self.events, summary="Server-sent events: heads, rounds, peers, fetch progress",
            params=(Param("replay", int, "Past events to send first", default=0),),
        )
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
            "training": self._training(),
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

    def _training(self) -> dict[str, Any] | None:
        outer = self.node.outer
        if outer is None or outer.heads is None:
            return None
        head = outer.heads.canonical()
        losses = outer.heads.eval.get(head.id, {})
        view = outer.view
        return {
            "role": outer.config.training.role,
            "workload": outer.config.workload.name,
            "round": view.round,
            "phase": view.phase,
            "head": head.id,
            "head_round": head.round,
            "epoch": head.epoch,
            "samples_total": head.samples_total,
            "val_loss": losses.get(self.node.key.peer_id if self.node.key else "", next(iter(losses.values()), None)),
            "leased": view.leased,
            "waiting_for": view.waiting_for,
            "deadline_in_s": view.deadline_in_s,
            "utilisation": round(outer.utilisation(), 4),
            "inner_seconds": round(outer.trainer.inner_seconds, 2),
            "last_error": outer.trainer.last_error,
            "round_failures": outer.round_failures,
            "update_rejections": dict(outer.update_rejections),
            "head_rejections": dict(outer.heads.rejected),
        }

    def _heads(self) -> Any:
        outer = self.node.outer
        if outer is None or outer.heads is None:
            raise HttpError(503, "training is not running")
        return outer.heads

    def _head_row(self, head: Any) -> dict[str, Any]:
        heads = self._heads()
        losses = heads.eval.get(head.id, {})
        return {
            "id": head.id,
            "canonical": head.id == heads.adopted,
            "parent": head.parent,
            "round": head.round,
            "epoch": head.epoch,
            "samples": head.samples,
            "samples_total": head.samples_total,
            "updates": len(head.updates),
            "excluded": len(head.excluded),
            "val_loss": (sum(losses.values()) / len(losses)) if losses else None,
        }

    async def heads(self, request: Request) -> Response:
        heads = self._heads()
        return json_response({"canonical": heads.adopted, "heads": [self._head_row(h) for h in heads.recent()]})

    def _find_head(self, head_id: str) -> Any:
        if not is_content_id(head_id):
            raise HttpError(400, "head id must be b3:<64 hex digits>")
        head = self._heads().index.get(head_id)
        if head is None:
            raise HttpError(404, "unknown head")
        return head

    async def head(self, request: Request) -> Response:
        head = self._find_head(request.params["id"])
        heads = self._heads()
        return json_response({
            "id": head.id, "canonical": head.id == heads.adopted, "record": head.to_wire(),
            "eval": heads.eval.get(head.id, {}),
        })

    async def head_weights(self, request: Request) -> Response:
        head = self._find_head(request.params["id"])
        node = self.node
        assert node.store is not None
        path = node.data_dir / "exports" / f"{head.id[3:19]}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                await asyncio.to_thread(materialise_safetensors, node.store, head.weights, path)
            except MissingContent:
                raise HttpError(404, "this peer does not hold the head's weights") from None
        return await file_response(path, download_name=f"head-{head.round}-{head.id[3:15]}.safetensors")

    async def leases(self, request: Request) -> Response:
        outer = self.node.outer
        if outer is None or outer.leasing is None or outer.heads is None:
            raise HttpError(503, "training is not running")
        ledger = outer._ledger(outer.heads.canonical())
        coverage = ledger.coverage(outer.leasing.book.leased())
        return json_response({
            **outer.leasing.view(),
            "coverage": {
                "epoch": coverage.epoch, "done": len(coverage.done), "leased": len(coverage.leased),
                "free": len(coverage.free), "planned": len(ledger.planned),
            },
        })

    async def events(self, request: Request) -> EventStream:
        replay = request.args.get("replay", 0)
        if not 0 <= replay <= 256:
            raise HttpError(400, "replay must be between 0 and 256")

        async def stream():  # type: ignore[no-untyped-def]
            async for event in self.node.events.subscribe(replay):
                yield Event(data=json.dumps(event.view()), event=event.kind, id=str(event.seq))

        return EventStream(stream())
