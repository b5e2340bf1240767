"""A small HTTP/1.1 server on asyncio streams for the status port: routes, JSON, file streams, SSE.

Dependency-free so the daemon stays a plain pip install; routes are declared with their metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import json
import math
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, BinaryIO

from node.logs import get_logger

log = get_logger(__name__)

CHUNK_BYTES = 1 << 20
LINGER_S = 2.0


@dataclass(frozen=True)
class HttpLimits:
    """What one connection may cost the node before it is answered with an error or dropped."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1 << 20
    # The whole request head, and the wait for the next request on a kept-alive connection,
    # must fit in this; a client that trickles bytes (slowloris) is dropped when it runs out.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0


class HttpError(Exception):
    """Raised by a handler (or the server) to answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.headers = headers


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Param:
    """A declared query parameter: parsed to ``type`` before the handler runs, listed in the route table."""

    name: str
    type: type = str  # str, int, float or bool
    help: str = ""
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class Request:
    """One parsed request. ``params`` are path parameters; ``args`` the declared query parameters, typed."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    query: Mapping[str, str]
    body: bytes = b""
    client: str = ""
    params: Mapping[str, str] = field(default_factory=dict)
    args: Mapping[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        """The body parsed as JSON; a 400 HttpError when it is not."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"invalid JSON body: {exc}") from None

    def bearer_token(self) -> str | None:
        """The token of an ``Authorization: Bearer`` header, if there is one."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_bearer(request: Request, token: str) -> None:
    """Let the request through only with ``Authorization: Bearer <token>``; 403 when no token is set."""
    if not token:
        raise HttpError(403, "disabled: this node has no status token configured")
    given = request.bearer_token()
    if given is None:
        raise HttpError(401, "missing bearer token", (("WWW-Authenticate", "Bearer"),))
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HttpError(401, "wrong bearer token", (("WWW-Authenticate", "Bearer"),))


# ---------------------------------------------------------------- responses


@dataclass(frozen=True)
class Response:
    """A complete response body held in memory."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StreamResponse:
    """A body of known ``length`` sent chunk by chunk as ``chunks`` yields it (weight downloads)."""

    chunks: AsyncIterable[bytes]
    length: int
    content_type: str = "application/octet-stream"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Event:
    """One server-sent event; ``data`` may span lines."""

    data: str
    event: str = ""
    id: str = ""

    @classmethod
    def json(cls, event: str, value: Any) -> Event:
        """An event named ``event`` whose data is ``value`` as JSON."""
        return cls(json.dumps(value), event=event)

    def encode(self) -> bytes:
        lines = [f"event: {_one_line(self.event)}"] if self.event else []
        if self.id:
            lines.append(f"id: {_one_line(self.id)}")
        data_lines = self.data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        lines += [f"data: {line}" for line in data_lines]
        return ("\n".join(lines) + "\n\n").encode()


@dataclass(frozen=True)
class EventStream:
    """A server-sent event stream: ``events`` is read until it ends or the client leaves."""

    events: AsyncIterable[Event]
    # Comment lines on a quiet stream keep proxies from timing the connection out and let
    # the server notice a client that went away.
    keepalive_s: float = 15.0


Reply = Response | StreamResponse | EventStream
Handler = Callable[[Request], Awaitable[Reply]]


def json_response(value: Any, status: int = 200, *, indent: int | None = None) -> Response:
    """``value`` as JSON, keys in the order given."""
    return Response(json.dumps(value, indent=indent).encode(), status)


def text_response(text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> Response:
    """Text (Prometheus metrics, the dashboard's HTML) as UTF-8."""
    return Response(text.encode(), status, content_type)


def error_response(error: HttpError) -> Response:
    """The JSON body every error carries: ``{"error": message}``."""
    return Response(json.dumps({"error": error.message}).encode(), error.status, headers=error.headers)


async def file_response(
    path: str | os.PathLike[str],
    *,
    content_type: str = "application/octet-stream",
    download_name: str = "",
) -> StreamResponse:
    """Stream a file from disk, reading in a worker thread; 404 when it does not exist.

    The file is opened here, so it streams whole even if it is replaced or deleted meanwhile."""
    try:
        file = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        raise HttpError(404, "not found") from None
    size = os.fstat(file.fileno()).st_size
    return stream_file(file, size, content_type=content_type, download_name=download_name)


def stream_file(
    file: BinaryIO, size: int, *, content_type: str = "application/octet-stream", download_name: str = ""
) -> StreamResponse:
    """A reply that sends ``size`` bytes of the open ``file`` and then closes it."""
    headers: tuple[tuple[str, str], ...] = ()
    if download_name:
        safe = re.sub(r'["\\\r\n]', "_", download_name)
        headers = (("Content-Disposition", f'attachment; filename="{safe}"'),)
    return StreamResponse(FileChunks(file, size), size, content_type, headers=headers)


class FileChunks:
    """An open file's first ``size`` bytes, CHUNK_BYTES at a time, read in a worker thread. The
    file is closed at the end or by ``aclose`` (a HEAD request never reads it)."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._remaining = size

    def __aiter__(self) -> FileChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = b""
        if self._remaining > 0 and not self._file.closed:
            chunk = await asyncio.to_thread(self._file.read, min(CHUNK_BYTES, self._remaining))
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        self._remaining -= len(chunk)
        return chunk

    async def aclose(self) -> None:
        if not self._file.closed:
            await asyncio.to_thread(self._file.close)


# ---------------------------------------------------------------- the Host a request names


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_host_names(bound: str) -> frozenset[str] | None:
    """The names a request's ``Host`` may give to a server bound to ``bound``; None: any name.

    A page in a browser can point a name it controls at 127.0.0.1 (DNS rebinding) and so read
    the port as same-origin, but its requests still name that host: a Host check stops it. A
    loopback bind answers to localhost, 127.0.0.1 and [::1] as well as its own address; a
    wildcard bind (0.0.0.0, ::) answers to any name, since it cannot know the names it has.
    Ports are not compared: an SSH tunnel or a container's port mapping changes the port, and
    a rebinding page cannot choose the name.
    """
    name = bound.strip().strip("[]").lower().rstrip(".")
    if name in ("", "0.0.0.0", "::"):
        return None
    return frozenset({name} | (LOOPBACK_NAMES if _is_loopback(name) else set()))


def host_name(header: str) -> str:
    """The name a Host header gives: without the port and brackets, in lower case."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.partition(":")[0].rstrip(".")


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- routing


@dataclass(frozen=True)
class Route:
    """One route and the metadata an OpenAPI description is generated from."""

    method: str
    pattern: str
    handler: Handler
    summary: str = ""
    params: tuple[Param, ...] = ()
    mutating: bool = False

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(re.findall(r"\{(\w+)\}", self.pattern))

    def match(self, path: str) -> dict[str, str] | None:
        found = _compile(self.pattern).fullmatch(path)
        return found.groupdict() if found else None


@contextlib.contextmanager
def _bad_request(what: str) -> Iterator[None]:
    try:
        yield
    except ValueError:
        raise HttpError(400, f"malformed {what}") from None


@functools.cache
def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts))
    return re.compile(regex)


class HttpApp:
    """A route table; mutating routes require the bearer ``token`` (and are disabled without one)."""

    def __init__(self, token: str = "") -> None:
        self._token = token
        self._routes: list[Route] = []

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes)

    def route(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        summary: str = "",
        params: tuple[Param, ...] = (),
        mutating: bool = False,
    ) -> None:
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern {pattern!r} must start with '/'")
        if any(param.type not in _PARAM_TYPES for param in params):
            raise ValueError(f"query parameters of {pattern} must be str, int, float or bool")
        if any(r.method == method and r.pattern == pattern for r in self._routes):
            raise ValueError(f"route {method} {pattern} is already registered")
        self._routes.append(Route(method.upper(), pattern, handler, summary, tuple(params), mutating))

    async def handle(self, request: Request) -> Reply:
        """The reply to ``request``: a handler's, or a JSON error; never raises except on cancellation."""
        try:
            route, params = self._find(request)
            with _bad_request("path parameter"):
                decoded = {k: urllib.parse.unquote(v, errors="strict") for k, v in params.items()}
            if route.mutating:
                check_bearer(request, self._token)
            args = _parse_args(route.params, request.query)
            reply = await route.handler(dataclasses.replace(request, params=decoded, args=args))
            if not isinstance(reply, (Response, StreamResponse, EventStream)):
                raise TypeError(f"{route.method} {route.pattern} returned {type(reply).__name__}, not a reply")
            return reply
        except HttpError as error:
            return error_response(error)
        except Exception:
            # The traceback is for the operator's log only; clients learn nothing about internals.
            log.exception("http handler failed", method=request.method, path=request.path)
            return error_response(HttpError(500, "internal server error"))

    def _find(self, request: Request) -> tuple[Route, dict[str, str]]:
        method = "GET" if request.method == "HEAD" else request.method
        allowed = []
        for route in self._routes:
            params = route.match(request.path)
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed += [route.method, "HEAD"] if route.method == "GET" else [route.method]
        if allowed:
            raise HttpError(405, "method not allowed", (("Allow", ", ".join(sorted(set(allowed)))),))
        raise HttpError(404, "not found")


_PARAM_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _parse_args(declared: tuple[Param, ...], query: Mapping[str, str]) -> dict[str, Any]:
    args = {}
    for param in declared:
        raw = query.get(param.name)
        if raw is None:
            if param.required:
                raise HttpError(400, f'query parameter "{param.name}" is required')
            args[param.name] = param.default
            continue
        try:
            args[param.name] = _parse_typed(param.type, raw)
        except ValueError:
            problem = f"expected {_PARAM_TYPES[param.type]}, got {json.dumps(raw)}"
            raise HttpError(400, f'query parameter "{param.name}": {problem}') from None
    return args


def _parse_typed(kind: type, raw: str) -> Any:
    if kind is int:
        # int() alone would also take " 7", "+7" and "7_000".
        if not re.fullmatch(r"-?[0-9]+", raw):
            raise ValueError(raw)
        return int(raw)
    if kind is float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    if kind is bool:
        if raw not in ("true", "false", "1", "0"):
            raise ValueError(raw)
        return raw in ("true", "1")
    return raw


# ---------------------------------------------------------------- the server


class HttpServer:
    """A listening server; create it with ``start_http`` and stop it with ``close``."""

    def __init__(self, app: HttpApp, limits: HttpLimits) -> None:
        self._app = app
        self._limits = limits
        self._server: asyncio.Server | None = None
        self._hosts: frozenset[str] | None = None
        # Connection tasks are owned here so that close() ends open event streams too.
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (the one the OS picked for port 0; of the first socket, for a host name)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every open connection, event streams included."""
        if self._server is None:
            return
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _start(self, host: str, port: int) -> None:
        # The reader's limit bounds readuntil(), so it caps the request head.
        limit = self._limits.max_header_bytes
        self._hosts = allowed_host_names(host)
        self._server = await asyncio.start_server(self._serve, host, port, limit=limit)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        try:
            while await self._exchange(reader, writer, client):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or stalled; nothing is owed to it
        except Exception:
            # A body stream that fails after its head is sent cannot become a 500 any more.
            log.exception("http connection failed", client=client)
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                async with asyncio.timeout(LINGER_S):
                    await writer.wait_closed()
            except (TimeoutError, ConnectionError):
                # A client that stopped reading would otherwise hold close() open forever.
                writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str) -> bool:
        """Serve one request; whether the connection stays open for another."""
        try:
            async with asyncio.timeout(self._limits.header_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _refuse(reader, writer, HttpError(431, "request header too large"))
            return False
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                await _refuse(reader, writer, HttpError(400, "incomplete request"))
            return False
        started = time.monotonic()
        try:
            request, keep_alive, length = _parse_head(head, client, self._limits.max_body_bytes)
            self._check_host(request)
            if length and request.headers.get("expect", "").lower() == "100-continue":
                # curl asks before sending a body over 1 KiB and would otherwise pause a second.
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            async with asyncio.timeout(self._limits.body_timeout_s):
                body = await reader.readexactly(length) if length else b""
        except HttpError as error:
            await _refuse(reader, writer, error)
            return False
        reply = await self._app.handle(dataclasses.replace(request, body=body))
        keep_alive = keep_alive and isinstance(reply, Response)
        if request.method == "HEAD":
            await _write_head_only(writer, reply, keep_alive)
        elif isinstance(reply, Response):
            await _write_response(writer, reply, keep_alive)
        elif isinstance(reply, StreamResponse):
            await _write_stream(writer, reply)
        else:
            await _write_events(reader, writer, reply)
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        status = 200 if isinstance(reply, EventStream) else reply.status
        log.debug("http request", method=request.method, path=request.path, status=status, ms=elapsed_ms)
        return keep_alive


    def _check_host(self, request: Request) -> None:
        """421 for a request that names another server (a DNS-rebinding page); no Host is no browser."""
        host = request.headers.get("host")
        if self._hosts is None or host is None or host_name(host) in self._hosts:
            return
        names = ", ".join(f"[{n}]" if ":" in n else n for n in sorted(self._hosts))
        raise HttpError(421, f"Host {_one_line(host)[:100]!r} is not this status port; it answers to {names}")


async def start_http(app: HttpApp, host: str, port: int, *, limits: HttpLimits = HttpLimits()) -> HttpServer:
    """Bind ``host:port`` (port 0: any free port, see ``server.port``) and start serving ``app``."""
    server = HttpServer(app, limits)
    await server._start(host, port)
    return server


# ---------------------------------------------------------------- wire format


def _parse_head(head: bytes, client: str, max_body: int) -> tuple[Request, bool, int]:
    """The request, whether to keep the connection alive, and the body length to read."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not re.fullmatch(r"[A-Z]+", parts[0]) or not parts[1].startswith("/"):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise HttpError(400, "malformed header line")
        name = name.lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(501, "chunked request bodies are not supported; send Content-Length")
    length_text = headers.get("content-length", "0")
    if not re.fullmatch(r"[0-9]{1,15}", length_text):
        raise HttpError(400, "malformed Content-Length")
    if int(length_text) > max_body:
        raise HttpError(413, f"request body larger than {max_body} bytes")

    path, _, query_text = target.partition("?")
    with _bad_request("query string"):
        pairs = urllib.parse.parse_qsl(query_text, True, errors="strict", max_num_fields=100)
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query:
            raise HttpError(400, f'query parameter "{name}" given more than once')
        query[name] = value
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = version == "HTTP/1.1" and "close" not in tokens
    return Request(method, path, headers, query, client=client), keep_alive, int(length_text)


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}"]
    for name, value in headers:
        # A CR or LF in a value would let a handler's data forge headers of its own.
        lines.append(f"{name}: {_one_line(value)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _reply_head(reply: Reply, keep_alive: bool) -> bytes:
    connection = ("Connection", "keep-alive" if keep_alive else "close")
    if isinstance(reply, EventStream):
        return _head(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"), connection])
    length = len(reply.body) if isinstance(reply, Response) else reply.length
    headers = [("Content-Type", reply.content_type), ("Content-Length", str(length)), connection, *reply.headers]
    return _head(reply.status, headers)


async def _write_response(writer: asyncio.StreamWriter, response: Response, keep_alive: bool) -> None:
    writer.write(_reply_head(response, keep_alive) + response.body)
    await writer.drain()


async def _write_head_only(writer: asyncio.StreamWriter, reply: Reply, keep_alive: bool) -> None:
    """Answer HEAD: the GET route's head, its body never produced."""
    writer.write(_reply_head(reply, keep_alive))
    await writer.drain()
    body: object = reply.events if isinstance(reply, EventStream) else getattr(reply, "chunks", None)
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: HttpError) -> None:
    """Answer a request that will not be read, then drain what the client is still sending."""
    await _write_response(writer, error_response(error), False)
    if writer.can_write_eof():
        writer.write_eof()
    # Closing with unread bytes in the socket makes the kernel send a reset, which can destroy
    # the error response before the client reads it; so swallow the rest, for a bounded time.
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            while await reader.read(CHUNK_BYTES):
                pass


async def _write_stream(writer: asyncio.StreamWriter, response: StreamResponse) -> None:
    writer.write(_reply_head(response, False))
    sent = 0
    chunks = aiter(response.chunks)
    try:
        async for chunk in chunks:
            if sent + len(chunk) > response.length:
                break
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
    finally:
        if hasattr(chunks, "aclose"):
            await chunks.aclose()
    if sent != response.length:
        # The client sees a body shorter than Content-Length when the connection closes,
        # which is the only honest signal left once the head is sent.
        log.error("http stream length mismatch", promised=response.length, sent=sent)


async def _write_events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: EventStream) -> None:
    writer.write(_reply_head(stream, False))
    await writer.drain()
    events = aiter(stream.events)
    # Clients send nothing on an event stream, so any read completing means they left.
    client_gone = asyncio.ensure_future(reader.read(1))
    next_event: asyncio.Future[Event] | None = None
    try:
        while True:
            if next_event is None:
                next_event = asyncio.ensure_future(anext(events))
            waiting: set[asyncio.Future[Any]] = {next_event, client_gone}
            done, _ = await asyncio.wait(waiting, timeout=stream.keepalive_s, return_when=asyncio.FIRST_COMPLETED)
            if client_gone in done:
                return
            if next_event in done:
                try:
                    event = next_event.result()
                except StopAsyncIteration:
                    return
                next_event = None
                writer.write(event.encode())
            else:
                writer.write(b": keepalive\n\n")
            await writer.drain()
    finally:
        for task in (next_event, client_gone):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (next_event, client_gone) if t is not None), return_exceptions=True)
        if hasattr(events, "aclose"):
            await events.aclose()


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")
