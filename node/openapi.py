"""The status port's OpenAPI 3.1 description: paths from the live route table, answers from the schemas here."""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from node.http import HttpApp, Param, Request, Response, Route, json_response

OPENAPI_VERSION = "3.1.0"
CONTENT_ID = {"type": "string", "pattern": "^b3:[0-9a-f]{64}$"}
JSON = "application/json"

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], optional: tuple[str, ...] = ()) -> Schema:
    """An object whose every listed property is required, except those named in ``optional``."""
    return {
        "type": "object",
        "required": [name for name in properties if name not in optional],
        "properties": properties,
    }


def counts(values: Schema | None = None) -> Schema:
    """A map of names (kinds, reasons, peers) to counts."""
    return {"type": "object", "additionalProperties": values or {"type": "integer", "minimum": 0}}


STRING, INTEGER, NUMBER, BOOLEAN = ({"type": t} for t in ("string", "integer", "number", "boolean"))
COUNT = {"type": "integer", "minimum": 0}
STRINGS = {"type": "array", "items": STRING}

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": STRING}),
    "Health": obj({"ok": BOOLEAN}),
    "Status": obj({
        "peer_id": STRING,
        "name": STRING,
        "swarm": STRING,
        "addrs": STRINGS,
        "uptime_s": NUMBER,
        "peers": obj({"live": COUNT, "dead": COUNT, "connected": COUNT}),
        "stream_faults": counts(),
        "gossip": obj({
            "topic": STRING, "accepted": counts(), "published": counts(), "rejected": counts(),
            "publish_failures": COUNT, "handler_errors": COUNT, "dropped_queue_full": COUNT,
        }),
        "rejected": counts(),
        "heartbeats_sent": COUNT,
        "exchange": nullable(ref("ExchangeCounters")),
        "training": nullable(ref("Training")),
    }),
    "Training": obj({
        "role": STRING,
        "workload": STRING,
        "round": COUNT,
        "phase": STRING,
        "head": CONTENT_ID,
        "head_round": COUNT,
        "epoch": COUNT,
        "samples_total": COUNT,
        "val_loss": nullable(NUMBER),
        "leased": COUNT,
        "waiting_for": nullable(STRINGS),
        "deadline_in_s": nullable(NUMBER),
        "utilisation": NUMBER,
        "inner_seconds": NUMBER,
        "phase_seconds": counts(NUMBER),
        "eval_seconds": NUMBER,
        "verifications": counts(),
        "merges": COUNT,
        "overlap": counts(),
        "last_error": nullable(STRING),
        "round_failures": COUNT,
        "rounds_without_head": COUNT,
        "microshards_repaired": COUNT,
        "update_rejections": counts(),
        "head_rejections": counts(),
    }),
    "Peer": obj({
        "peer_id": STRING,
        "alive": BOOLEAN,
        "connected": BOOLEAN,
        "last_seen_s_ago": NUMBER,
        "first_seen_ms": INTEGER,
        "deaths": COUNT,
        "addrs": STRINGS,
        "role": STRING,
        "software": STRING,
        "protocol_version": INTEGER,
        "head": nullable(STRING),
        "round": COUNT,
        "device": STRING,
        "capabilities": counts({"type": ["integer", "string"]}),
    }),
    "Peers": obj({"peers": {"type": "array", "items": ref("Peer")}}),
    "HeadRow": obj({
        "id": CONTENT_ID,
        "canonical": BOOLEAN,
        "parent": nullable(CONTENT_ID),
        "round": COUNT,
        "epoch": COUNT,
        "samples": COUNT,
        "samples_total": COUNT,
        "updates": COUNT,
        "excluded": COUNT,
        "val_loss": nullable(NUMBER),
    }),
    "Heads": obj({"canonical": CONTENT_ID, "heads": {"type": "array", "items": ref("HeadRow")}}),
    "Chain": obj({"canonical": CONTENT_ID, "chain": {"type": "array", "items": ref("HeadRow")}}),
    "Head": obj({
        "id": CONTENT_ID,
        "canonical": BOOLEAN,
        "record": {"type": "object", "description": "The head record as it travels on the wire."},
        "eval": counts(NUMBER),
    }),
    "Leases": obj({
        "epoch": COUNT,
        "round": COUNT,
        "own": STRINGS,
        "leases": {"type": "array", "items": obj({
            "lease_id": STRING, "peer": STRING, "round": COUNT, "microshards": COUNT, "holding": COUNT,
            "expires_in_s": NUMBER,
        })},
        "rejected": counts(),
        "benched_s": NUMBER,
        "pending_future": COUNT,
        "excluded": {"type": "object", "additionalProperties": obj({"strikes": COUNT, "rounds_left": COUNT})},
        "coverage": obj({"epoch": COUNT, "done": COUNT, "leased": COUNT, "free": COUNT, "planned": COUNT}),
    }),
    "Fetch": obj({
        "manifest_id": CONTENT_ID,
        "state": {"enum": ["starting", "fetching", "done", "failed", "cancelled"]},
        "total_chunks": COUNT,
        "have_chunks": COUNT,
        "total_bytes": COUNT,
        "have_bytes": COUNT,
        "fetched_bytes": COUNT,
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "elapsed_s": NUMBER,
        "rate_bytes_per_s": NUMBER,
        "eta_s": nullable(NUMBER),
        "providers": STRINGS,
        "dropped_providers": counts(STRING),
        "fan_out": nullable(ref("FanOut")),
        "error": nullable(STRING),
    }),
    "FanOut": obj({
        "width": {"enum": ["narrow", "wide"]},
        "adaptive": BOOLEAN,
        "chosen": nullable({"enum": ["narrow", "wide"]}),
        "comparisons": COUNT,
        "receiver_bound": COUNT,
        "rate_bytes_per_s": counts(NUMBER),
        "receiver_cores": counts(NUMBER),
        "receiver_waiting": counts(NUMBER),
    }),
    "Fetches": obj({"fetches": {"type": "array", "items": ref("Fetch")}}),
    "ExchangeCounters": obj({
        "bytes_in": COUNT, "bytes_out": COUNT, "chunks_in": COUNT, "chunks_out": COUNT,
        "chunks_verified": COUNT, "requests_served": COUNT, "bad_requests": COUNT, "busy_refusals": COUNT,
        "rejected_chunks_by_peer": counts(), "timeouts_by_peer": counts(),
        "bytes_in_by_kind": counts(), "bytes_out_by_kind": counts(),
    }),
    "Exchange": {"allOf": [ref("ExchangeCounters"), obj({"fetches": {"type": "array", "items": ref("Fetch")}})]},
    "FetchStarted": {"anyOf": [ref("Fetch"), obj({"manifest_id": CONTENT_ID})]},
    "FetchCancelled": obj({"cancelled": CONTENT_ID}),
    "FetchRequest": obj({"manifest": CONTENT_ID}),
}

TRAINING_OFF = ("503", "Training is not running on this peer")


def _json(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}}


def _body(media: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema or {"type": "string"}}}}


# The successful answers, and errors particular to a route; the generic ones are added per route below.
ANSWERS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/"): {"200": _body("text/html", "The dashboard page")},
    ("GET", "/static/{name}"): {"200": {"description": "A dashboard file (HTML, JavaScript or CSS)", "content": {
        media: {"schema": {"type": "string"}} for media in ("text/html", "text/javascript", "text/css")}}},
    ("GET", "/healthz"): {"200": _json("Health"), "503": _json("Health", "libp2p is not running")},
    ("GET", "/status"): {"200": _json("Status")},
    ("GET", "/peers"): {"200": _json("Peers")},
    ("GET", "/heads"): {"200": _json("Heads")},
    ("GET", "/chain"): {"200": _json("Chain")},
    ("GET", "/heads/{id}"): {"200": _json("Head")},
    ("GET", "/heads/{id}/weights"): {"200": _body(
        "application/octet-stream", "The head's weights as a safetensors file",
        {"type": "string", "contentMediaType": "application/octet-stream"},
    )},
    ("GET", "/leases"): {"200": _json("Leases")},
    ("GET", "/events"): {"200": _body(
        "text/event-stream", "Server-sent events; each event's data is one JSON object with seq, kind and at",
    )},
    ("GET", "/exchange"): {"200": _json("Exchange")},
    ("GET", "/fetches"): {"200": _json("Fetches")},
    ("POST", "/fetches"): {"202": _json("FetchStarted", "The fetch runs (or was already running)")},
    ("DELETE", "/fetches/{id}"): {"200": _json("FetchCancelled")},
    ("GET", "/metrics"): {"200": _body("text/plain", "Prometheus text exposition format 0.0.4")},
    ("GET", "/openapi.json"): {"200": {"description": "This document", "content": {JSON: {"schema": {
        "type": "object"}}}}},
}
NEEDS_TRAINING = {"/heads", "/chain", "/heads/{id}", "/heads/{id}/weights", "/leases"}
REQUEST_BODIES = {("POST", "/fetches"): "FetchRequest"}
PATH_SCHEMAS = {("/heads/{id}", "id"): CONTENT_ID, ("/heads/{id}/weights", "id"): CONTENT_ID}
PARAM_SCHEMAS: dict[type, Schema] = {str: STRING, int: INTEGER, float: NUMBER, bool: BOOLEAN}


def describe(app: HttpApp) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every route ``app`` has now."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.routes:
        paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(route)
    try:
        version = metadata.version("p2p-node")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "p2p-node status port",
            "version": version,
            "description": (
                "The local HTTP status port of a p2p-node peer: JSON for status, peers, heads, leases and the "
                "chunk exchange; server-sent events; Prometheus metrics; a dashboard page. Every error answers "
                "with {\"error\": message}. Mutating routes need the node's bearer token. A request whose Host "
                "header names another server is refused with 421 (DNS rebinding)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(route: Route) -> dict[str, Any]:
    key = (route.method, route.pattern)
    responses = dict(ANSWERS.get(key, {"200": {"description": "OK", "content": {JSON: {"schema": {}}}}}))
    error = ref("Error")
    if route.params or route.path_params or key in REQUEST_BODIES:
        responses.setdefault("400", _json("Error", "Malformed parameter or body"))
    if route.path_params:
        responses.setdefault("404", _json("Error", "Not found"))
    if route.pattern in NEEDS_TRAINING:
        responses.setdefault(TRAINING_OFF[0], _json("Error", TRAINING_OFF[1]))
    if route.mutating:
        responses["401"] = _json("Error", "Missing or wrong bearer token")
        responses["403"] = _json("Error", "Disabled: this node has no status token configured")
    responses["421"] = _json("Error", "The Host header names another server than this port (DNS rebinding)")
    responses["default"] = {"description": "Any other error", "content": {JSON: {"schema": error}}}
    operation: dict[str, Any] = {
        "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', route.pattern.lower()).strip('_') or 'root'}",
        "summary": route.summary or f"{route.method} {route.pattern}",
        "responses": responses,
    }
    parameters = [_path_param(route.pattern, name) for name in route.path_params]
    parameters += [_query_param(param) for param in route.params]
    if parameters:
        operation["parameters"] = parameters
    if key in REQUEST_BODIES:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(REQUEST_BODIES[key])}}}
    if route.mutating:
        operation["security"] = [{"bearer": []}]
    return operation


def _path_param(pattern: str, name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": PATH_SCHEMAS.get((pattern, name), STRING)}


def _query_param(param: Param) -> dict[str, Any]:
    schema = dict(PARAM_SCHEMAS[param.type])
    if param.default is not None:
        schema["default"] = param.default
    described: dict[str, Any] = {"name": param.name, "in": "query", "required": param.required, "schema": schema}
    if param.help:
        described["description"] = param.help
    return described


class OpenApi:
    """``GET /openapi.json``: described anew on each request, so routes added later appear too."""

    def __init__(self, app: HttpApp) -> None:
        self.app = app

    async def handle(self, request: Request) -> Response:
        return json_response(describe(self.app))
