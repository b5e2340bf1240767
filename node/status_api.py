"""The status port's routes: health, status, peers, heads, leases and the exchange, as JSON."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.artifacts import MissingContent
from node.dashboard import Dashboard
from node.http import (
    Event,
    EventStream,
    HttpApp,
    HttpError,
    Param,
    Request,
    Response,
    StreamResponse,
    json_response,
    start_http,
    stream_file,
)
from node.convergence import convergence, node_view
from node.distribution import write_variant_safetensors
from node.exchange import FetchFailed
from node.exports import ExportCache
from node.operator import Operations, PublishFailed, classify
from node.metrics import NodeMetrics
from node.openapi import OpenApi
from protocol.cid import is_content_id
from protocol.control import PatchRecord, check_warm_round
from protocol.errors import Invalid
from protocol.identity import public_key_from_peer_id

if TYPE_CHECKING:
    from node.daemon import Node

WEIGHTS_FETCH_TIMEOUT_S = 60.0


class StatusApi:
    """Routes over a running Node; each later concern adds its routes through ``app``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.app = HttpApp(token=node.config.status.token)
        self.url: str | None = None
        self._server: Any = None
        # Weight downloads need no token: their files are bounded (node/exports.py), not kept.
        self.exports = ExportCache(node.data_dir / "exports")
        self.app.route("GET", "/healthz", self.healthz, summary="Liveness: 200 while libp2p runs")
        self.app.route("GET", "/status", self.status, summary="This peer, its swarm and its counters")
        self.app.route("GET", "/peers", self.peers, summary="The peer table with liveness")
        self.app.route("GET", "/heads", self.heads, summary="Recent heads, the canonical one marked")
        self.app.route("GET", "/heads/{id}", self.head, summary="One head record")
        self.app.route(
            "GET", "/heads/{id}/weights", self.head_weights, summary="A head's weights as safetensors",
            params=(Param("variant", str, "fp32 (default), bf16 or int8", default="fp32"),),
        )
        self.app.route("GET", "/heads/{id}/variants", self.head_variants, summary="Announced encodings of a head")
        self.app.route("GET", "/leases", self.leases, summary="Own and observed leases, epoch coverage")
        self.app.route(
            "GET", "/events", self.events, summary="Server-sent events: heads, rounds, peers, fetch progress",
            params=(Param("replay", int, "Past events to send first", default=0),),
        )
        self.app.route("GET", "/convergence/{head}", self.convergence, summary="How far a head has spread")
        self.app.route("GET", "/nodes/{peer}", self.node_status, summary="One peer's model status")
        self.app.route("GET", "/heads/{id}/holders", self.holders, summary="Live peers holding a head")
        self.app.route("POST", "/rollback", self.rollback, summary="Roll the swarm back to a head", mutating=True)
        self.app.route("POST", "/patch", self.patch, summary="Change training settings from a round on", mutating=True)
        self.app.route("GET", "/exchange", self.exchange, summary="Chunk exchange counters and fetches")
        self.app.route("GET", "/fetches", self.fetches, summary="Fetches with their progress")
        self.app.route("POST", "/fetches", self.start_fetch, summary="Fetch an artifact by manifest id", mutating=True)
        self.app.route(
            "DELETE", "/fetches/{id}", self.cancel_fetch, summary="Cancel an in-flight fetch", mutating=True
        )
        # Operator surfaces; their logic lives in node/metrics.py, dashboard.py and openapi.py.
        dashboard = Dashboard(self)
        self.app.route("GET", "/", dashboard.index, summary="The dashboard page")
        self.app.route("GET", "/static/{name}", dashboard.asset, summary="The dashboard's scripts and styles")
        self.app.route(
            "GET", "/chain", dashboard.chain, summary="The canonical chain, oldest first, with validation losses",
            params=(Param("limit", int, "Newest heads to include (1-10000)", default=200),),
        )
        self.app.route("GET", "/metrics", NodeMetrics(node).handle, summary="Prometheus metrics")
        self.app.route("GET", "/openapi.json", OpenApi(self.app).handle, summary="This API's OpenAPI 3.1 description")

    async def start(self, host: str, port: int) -> None:
        await asyncio.to_thread(self.exports.trim)  # exports beyond the bounds, from an earlier run
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
            "stream_faults": dict(node.bridge.stats.stream_faults),
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
            "phase": view.phase.value,
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
            "phase_seconds": outer.phase_totals(),
            "eval_seconds": round(outer.eval_seconds, 2),
            "verifications": dict(outer.receipt.verifications) if outer.receipt else {},
            "merges": outer.receipt.merges if outer.receipt else 0,
            "overlap": dict(outer.overlap),
            "last_error": outer.trainer.last_error,
            "round_failures": outer.round_failures,
            "rounds_without_head": outer.rounds_without_head,
            "microshards_repaired": outer.source.repaired if outer.source else 0,
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

    async def head_weights(self, request: Request) -> Response | StreamResponse:
        head = self._find_head(request.params["id"])
        node = self.node
        assert node.store is not None and node.distribution is not None and node.exchange is not None
        variant = request.args.get("variant") or "fp32"
        if variant not in ("fp32", "bf16", "int8"):
            raise HttpError(400, "variant must be fp32, bf16 or int8")
        manifest = node.distribution.manifest_for(head, variant)
        if manifest is None:
            raise HttpError(404, f"no {variant} variant of this head is known")

        async def export(path: Path) -> None:
            assert node.store is not None and node.exchange is not None and manifest is not None
            try:
                await asyncio.to_thread(write_variant_safetensors, node.store, manifest, variant, path)
            except MissingContent:
                # Announced by others but not held here: fetch it from them, within bounds.
                try:
                    await asyncio.wait_for(node.exchange.fetch(manifest), WEIGHTS_FETCH_TIMEOUT_S)
                    await asyncio.to_thread(write_variant_safetensors, node.store, manifest, variant, path)
                except (FetchFailed, MissingContent, TimeoutError):
                    raise HttpError(404, f"no peer could serve the head's {variant} weights") from None

        file, size = await self.exports.open(f"{manifest[3:19]}-{variant}", export)
        name = f"head-{head.round}-{head.id[3:15]}-{variant}.safetensors"
        return stream_file(file, size, download_name=name)

    async def head_variants(self, request: Request) -> Response:
        head = self._find_head(request.params["id"])
        assert self.node.distribution is not None
        announced = self.node.distribution.variants.get(head.id, {})
        return json_response({
            "head": head.id,
            "variants": {"fp32": {head.weights: ["(canonical)"]},
                         **{v: {m: sorted(p) for m, p in ms.items()} for v, ms in announced.items()}},
        })

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

        async def stream() -> AsyncIterator[Event]:
            async for event in self.node.events.subscribe(replay):
                yield Event(data=json.dumps(event.view()), event=event.kind, id=str(event.seq))

        return EventStream(stream())

    # ---- convergence and operator control -------------------------------------------------

    def _self_view(self) -> dict[str, Any]:
        node = self.node
        assert node.key is not None and node.outer is not None and node.exchange is not None
        fields = node._heartbeat_fields()
        caps = fields.get("capabilities", {})
        return {
            "peer_id": node.key.peer_id, "alive": True, "role": node.config.training.role,
            "head": fields.get("head"), "round": fields.get("round", 0), "phase": caps.get("phase"),
            "device": fields.get("device"),
            "fetch": {
                "manifest": caps.get("fetch"),
                "progress": caps["fetch_permille"] / 1000 if "fetch_permille" in caps else None,
                "rate_bytes_per_s": caps.get("fetch_rate"), "bytes_left": caps.get("fetch_left"),
                "error": caps.get("fetch_error"),
            },
            "last_seen_ms": None,
        }

    async def convergence(self, request: Request) -> Response:
        head = self._find_head(request.params["head"])
        assert self.node.membership is not None
        return json_response(convergence(self.node.membership.table, head.id, head.round, self._self_view()))

    async def holders(self, request: Request) -> Response:
        head = self._find_head(request.params["id"])
        assert self.node.membership is not None
        report = convergence(self.node.membership.table, head.id, head.round, self._self_view())
        return json_response({"head": head.id, "holders": report["holder_ids"]})

    async def node_status(self, request: Request) -> Response:
        peer = request.params["peer"]
        node = self.node
        assert node.key is not None and node.membership is not None
        try:
            public_key_from_peer_id(peer)
        except Invalid:
            raise HttpError(400, "peer must be an ed25519 libp2p peer id (12D3KooW...)") from None
        if peer == node.key.peer_id:
            return json_response(self._self_view())
        view = node_view(node.membership.table, peer)
        if view is None:
            raise HttpError(404, "unknown peer")
        return json_response(view)

    def _operations(self) -> Operations:
        if self.node.operations is None:
            raise HttpError(503, "the node is not running")
        return self.node.operations

    async def _relay_or_sign(self, request: Request, sign: Any) -> Response:
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        operations = self._operations()
        try:
            if "record" in body:
                raw = bytes.fromhex(str(body["record"]))
                record = await operations.relay(raw, self._check_relayed)
                return json_response({"relayed": record.id, "kind": record.kind}, status=202)
            return json_response(await sign(operations, body), status=202)
        except PublishFailed as exc:
            raise HttpError(503, str(exc)[:300]) from None
        except ValueError as exc:  # Invalid is a ValueError; so is bad hex
            reason = getattr(exc, "reason", "malformed")
            status = 403 if reason in ("not_operator",) else 400
            raise HttpError(status, f"{reason}: {getattr(exc, 'detail', str(exc))}"[:300]) from None

    def _check_relayed(self, record: Any) -> None:
        """What this peer checks of an operator record before it relays it: a patch's warm round."""
        if isinstance(record.body, PatchRecord):
            self._check_effective_round(record.body.as_dict(), record.body.effective_round)

    def _check_effective_round(self, settings: dict[str, Any], effective: int) -> None:
        """Refuse a warm setting whose round may already have begun somewhere (``check_warm_round``)."""
        outer = self.node.outer
        if outer is None or outer.heads is None:
            return
        check_warm_round(settings, effective, outer.heads.canonical().round)

    async def rollback(self, request: Request) -> Response:
        async def sign(operations: Operations, body: dict[str, Any]) -> dict[str, Any]:
            target = body.get("head")
            if not is_content_id(target):
                raise HttpError(400, "body needs {\"head\": \"b3:...\"} or a signed {\"record\": hex}")
            self._find_head(target)
            record = await operations.rollback(target, str(body.get("reason", ""))[:500])
            return {"rollback": record.id, "target": target}

        return await self._relay_or_sign(request, sign)

    async def patch(self, request: Request) -> Response:
        async def sign(operations: Operations, body: dict[str, Any]) -> dict[str, Any]:
            settings = body.get("settings")
            effective = body.get("round")
            if not isinstance(settings, dict) or type(effective) is not int:
                raise HttpError(400, "body needs {\"settings\": {...}, \"round\": N} or a signed {\"record\": hex}")
            if not operations.is_operator:
                raise Invalid("not_operator", "this peer's key is not listed in swarm.operators")
            self._check_effective_round(settings, effective)
            record = await operations.patch(settings, effective)
            supported = self.node.outer.workload.supported_settings if self.node.outer else {}
            return {"patch": record.id, "effective_round": effective, "classes": classify(settings, supported)}

        return await self._relay_or_sign(request, sign)
