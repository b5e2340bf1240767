"""The status server over a real socket: routing, errors, auth, limits, downloads and SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from node.http import (
    Event,
    EventStream,
    HttpApp,
    HttpLimits,
    HttpServer,
    Param,
    Request,
    Response,
    StreamResponse,
    file_response,
    json_response,
    start_http,
)

TOKEN = "s3cret-token"


async def _status(request: Request) -> Response:
    return json_response({"peer": "12D3KooWexample", "round": 7})


async def _head(request: Request) -> Response:
    return json_response({"id": request.params["id"], "limit": request.args["limit"]})


async def _rollback(request: Request) -> Response:
    return json_response({"pinned": request.json()["head"]})


async def _boom(request: Request) -> Response:
    raise RuntimeError("secret internal detail")


def _app(tmp_path: Path, token: str = TOKEN) -> HttpApp:
    app = HttpApp(token=token)
    app.route("GET", "/status", _status, summary="This peer's status")
    app.route("GET", "/heads/{id}", _head, summary="One head", params=(Param("limit", int, "Most items", 10),))
    app.route("POST", "/rollback", _rollback, summary="Pin a head", mutating=True)
    app.route("GET", "/boom", _boom)

    async def weights(request: Request) -> StreamResponse:
        return await file_response(tmp_path / request.params["name"], download_name="weights.safetensors")

    app.route("GET", "/weights/{name}", weights)

    async def events(request: Request) -> EventStream:
        async def produce() -> AsyncIterator[Event]:
            yield Event.json("head", {"round": 1})
            yield Event("two\nlines", event="note", id="2")
            await asyncio.sleep(0.3)  # quiet long enough for a keepalive comment
            yield Event.json("head", {"round": 2})

        return EventStream(produce(), keepalive_s=0.1)

    app.route("GET", "/events", events)
    return app


async def _request(
    port: int, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; reads until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split(" ")[1]), parsed, payload


def _serve(tmp_path: Path, test: Callable[[HttpServer], Awaitable[None]], token: str = TOKEN) -> None:
    async def main() -> None:
        server = await start_http(_app(tmp_path, token), "127.0.0.1", 0)
        async with server:
            await asyncio.wait_for(test(server), 10)

    asyncio.run(main())


def test_json_route_and_path_parameters(tmp_path: Path) -> None:
    async def check(server: HttpServer) -> None:
        assert server.port > 0
        status, headers, body = await _request(server.port, "GET", "/status")
        assert (status, headers["content-type"]) == (200, "application/json")
        assert json.loads(body) == {"peer": "12D3KooWexample", "round": 7}
        assert list(json.loads(body)) == ["peer", "round"]  # keys keep their order

        status, _, body = await _request(server.port, "GET", "/heads/b3%3Aabc?limit=3")
        assert (status, json.loads(body)) == (200, {"id": "b3:abc", "limit": 3})
        status, _, body = await _request(server.port, "GET", "/heads/b3:abc")
        assert json.loads(body) == {"id": "b3:abc", "limit": 10}

    _serve(tmp_path, check)


def test_errors_are_json_with_the_right_status(tmp_path: Path) -> None:
    async def check(server: HttpServer) -> None:
        status, _, body = await _request(server.port, "GET", "/nowhere")
        assert (status, json.loads(body)) == (404, {"error": "not found"})

        status, headers, body = await _request(server.port, "DELETE", "/status")
        assert (status, headers["allow"]) == (405, "GET, HEAD")

        status, _, body = await _request(server.port, "GET", "/heads/x?limit=abc")
        assert status == 400
        assert json.loads(body) == {"error": 'query parameter "limit": expected an integer, got "abc"'}

        status, _, body = await _request(server.port, "GET", "/heads/x?limit=1&limit=2")
        assert status == 400

    _serve(tmp_path, check)


def test_handler_crash_is_a_500_that_reveals_nothing(tmp_path: Path) -> None:
    async def check(server: HttpServer) -> None:
        status, _, body = await _request(server.port, "GET", "/boom")
        assert (status, json.loads(body)) == (500, {"error": "internal server error"})
        assert b"secret" not in body and b"Traceback" not in body
        # The server is still serving after the crash.
        assert (await _request(server.port, "GET", "/status"))[0] == 200

    _serve(tmp_path, check)


def test_mutating_routes_need_the_bearer_token(tmp_path: Path) -> None:
    body = json.dumps({"head": "b3:01"}).encode()

    async def check(server: HttpServer) -> None:
        status, headers, reply = await _request(server.port, "POST", "/rollback", body)
        assert (status, json.loads(reply)["error"], headers["www-authenticate"]) == (
            401, "missing bearer token", "Bearer"
        )
        wrong = {"Authorization": "Bearer nope"}
        assert (await _request(server.port, "POST", "/rollback", body, wrong))[0] == 401
        right = {"Authorization": f"Bearer {TOKEN}"}
        status, _, reply = await _request(server.port, "POST", "/rollback", body, right)
        assert (status, json.loads(reply)) == (200, {"pinned": "b3:01"})
        status, _, reply = await _request(server.port, "POST", "/rollback", b"{not json", right)
        assert status == 400

    _serve(tmp_path, check)


def test_without_a_token_mutating_routes_are_disabled(tmp_path: Path) -> None:
    async def check(server: HttpServer) -> None:
        status, _, reply = await _request(server.port, "POST", "/rollback", b"{}", {"Authorization": "Bearer "})
        assert status == 403 and json.loads(reply)["error"].startswith("disabled")

    _serve(tmp_path, check, token="")


def test_oversized_requests_are_refused(tmp_path: Path) -> None:
    async def check(server: HttpServer) -> None:
        big = b"x" * (HttpLimits().max_body_bytes + 1)
        assert (await _request(server.port, "POST", "/rollback", big))[0] == 413
        huge_header = {"X-Filler": "a" * (HttpLimits().max_header_bytes + 10)}
        assert (await _request(server.port, "GET", "/status", headers=huge_header))[0] == 431

    _serve(tmp_path, check)


def test_malformed_request_line_is_a_400(tmp_path: Path) -> None:
    async def check(server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"NONSENSE\r\n\r\n")
        raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 400 ")

    _serve(tmp_path, check)


def test_slow_client_is_dropped() -> None:
    async def main() -> None:
        limits = HttpLimits(header_timeout_s=0.2)
        async with await start_http(HttpApp(), "127.0.0.1", 0, limits=limits) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    asyncio.run(main())


def test_keep_alive_serves_several_requests_on_one_connection(tmp_path: Path) -> None:
    async def check(server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(3):
            writer.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert json.loads(await reader.readexactly(length))["round"] == 7
        writer.close()

    _serve(tmp_path, check)


def test_large_file_streams_with_its_length(tmp_path: Path) -> None:
    blob = bytes(range(256)) * (12 * 1024 + 7)  # about 3 MiB: several chunks and an odd tail
    (tmp_path / "w.bin").write_bytes(blob)

    async def check(server: HttpServer) -> None:
        status, headers, body = await _request(server.port, "GET", "/weights/w.bin")
        assert status == 200
        assert int(headers["content-length"]) == len(blob)
        assert headers["content-disposition"] == 'attachment; filename="weights.safetensors"'
        assert body == blob
        assert (await _request(server.port, "GET", "/weights/missing.bin"))[0] == 404
        status, headers, body = await _request(server.port, "HEAD", "/weights/w.bin")
        assert (status, int(headers["content-length"]), body) == (200, len(blob), b"")

    _serve(tmp_path, check)


def test_server_sent_events_arrive_with_keepalives(tmp_path: Path) -> None:
    async def check(server: HttpServer) -> None:
        status, headers, body = await _request(server.port, "GET", "/events")
        assert (status, headers["content-type"]) == (200, "text/event-stream")
        text = body.decode()
        assert text.startswith('event: head\ndata: {"round": 1}\n\n')
        assert "event: note\nid: 2\ndata: two\ndata: lines\n\n" in text
        assert ": keepalive\n\n" in text
        assert text.endswith('event: head\ndata: {"round": 2}\n\n')

    _serve(tmp_path, check)


def test_close_ends_open_event_streams() -> None:
    async def endless(request: Request) -> EventStream:
        async def produce() -> AsyncIterator[Event]:
            while True:
                await asyncio.sleep(3600)
                yield Event("never")

        return EventStream(produce(), keepalive_s=3600)

    async def main() -> None:
        app = HttpApp()
        app.route("GET", "/events", endless)
        server = await start_http(app, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        await asyncio.wait_for(server.close(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    asyncio.run(main())


def test_routes_keep_their_metadata_for_openapi(tmp_path: Path) -> None:
    routes = {(r.method, r.pattern): r for r in _app(tmp_path).routes}
    head = routes[("GET", "/heads/{id}")]
    assert head.summary == "One head"
    assert head.path_params == ("id",)
    assert [(p.name, p.type, p.default) for p in head.params] == [("limit", int, 10)]
    assert routes[("POST", "/rollback")].mutating
