"""Framed streams through the libp2p bridge: two real hosts in this process, on 127.0.0.1.

``read_frames`` reads a run of frames with one task on the trio side and ``FrameWriter``
queues frames for one trio task to write; these are the exchange's hot path, so their
ordering, limits, deadlines and early exits are checked here directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest
import trio

from node.libp2p import BridgeError, FramedStream, FrameTooLarge, Libp2pBridge, StreamClosed

PROTOCOL = "/p2p-node/test-frames/1.0.0"


async def pair(handler) -> tuple[Libp2pBridge, Libp2pBridge, FramedStream]:
    """A server bridge serving ``handler``, a client bridge, and a client stream to the server."""
    server = Libp2pBridge(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
    client = Libp2pBridge(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
    await server.start()
    await client.start()
    await server.set_stream_handler(PROTOCOL, handler)
    peer = await client.connect(server.listen_addrs()[0], timeout=10)
    stream = await client.open_stream(peer, PROTOCOL, timeout=10)
    return server, client, stream


async def stop(*bridges: Libp2pBridge) -> None:
    for bridge in bridges:
        await bridge.stop()


def frame(index: int, size: int) -> bytes:
    return index.to_bytes(4, "big") * (size // 4)


async def serve_frames(stream: FramedStream) -> None:
    """Answer "N SIZE" with N frames of SIZE bytes through a FrameWriter with a small queue."""
    writer = stream.writer(max_pending_bytes=3 * 65536)
    try:
        while True:
            try:
                request = await stream.read_frame(64, timeout=30)
            except (BridgeError, TimeoutError):
                return
            count, size = map(int, request.split())
            for index in range(count):
                await writer.send(frame(index, size), timeout=30)
            await writer.drain(timeout=30)
    finally:
        writer.close()


def test_read_frames_yields_a_run_of_frames_in_order_and_the_stream_stays_usable():
    async def scenario() -> None:
        server, client, stream = await pair(serve_frames)
        try:
            reads_before = client.tcp_reads()
            for count, size in ((40, 65536), (3, 1 << 20), (1, 0)):
                await stream.write_frame(f"{count} {size}".encode(), timeout=10)
                got = [f async for f in stream.read_frames(count, 1 << 21, timeout=30)]
                assert got == [frame(i, size) for i in range(count)]
            # What the fetch fan-out reads: every byte the frames came in was read through TCP.
            assert client.tcp_reads().bytes - reads_before.bytes >= 40 * 65536 + 3 * (1 << 20)
            # The single-frame path still works on the same stream afterwards.
            await stream.write_frame(b"1 8", timeout=10)
            assert await stream.read_frame(64, timeout=10) == frame(0, 8)
        finally:
            await stop(client, server)

    asyncio.run(scenario())


@pytest.mark.parametrize("preset", [None, "1"])
def test_batched_window_credit_moves_many_times_the_window_in_small_frames(monkeypatch, preset):
    """With yamux credit batched (the bridge's tuning, unless the operator set their own value),
    a reader taking one small frame at a time still receives far more than one 256 KiB window:
    credit must keep coming back as it reads, or the writer stalls and the read times out."""
    if preset is None:
        monkeypatch.delenv("PY_YAMUX_RELEASE_ON_READ", raising=False)
    else:
        monkeypatch.setenv("PY_YAMUX_RELEASE_ON_READ", preset)

    async def scenario() -> None:
        server, client, stream = await pair(serve_frames)
        try:
            assert os.environ["PY_YAMUX_RELEASE_ON_READ"] == (preset or "0")
            for count, size in ((3000, 700), (5, 300_000), (2000, 8)):
                await stream.write_frame(f"{count} {size}".encode(), timeout=10)
                for index in range(count):
                    assert await stream.read_frame(1 << 20, timeout=10) == frame(index, size)
        finally:
            await stop(client, server)

    asyncio.run(scenario())


def test_read_frames_enforces_the_frame_limit():
    async def scenario() -> None:
        server, client, stream = await pair(serve_frames)
        try:
            await stream.write_frame(b"2 4096", timeout=10)
            frames = stream.read_frames(2, 1024, timeout=10)
            with pytest.raises(FrameTooLarge):
                await anext(frames)
            await frames.aclose()
        finally:
            await stop(client, server)

    asyncio.run(scenario())


def test_read_frames_times_out_on_a_silent_peer_and_reports_a_closed_stream():
    async def silent(stream: FramedStream) -> None:
        # Reads the request, sends one frame of the three asked for, then holds the stream open.
        await stream.read_frame(64, timeout=10)
        await stream.write_frame(b"only one", timeout=10)
        await asyncio.sleep(30)

    async def closes(stream: FramedStream) -> None:
        await stream.read_frame(64, timeout=10)
        await stream.write_frame(b"only one", timeout=10)

    async def scenario() -> None:
        server, client, stream = await pair(silent)
        try:
            await stream.write_frame(b"go", timeout=10)
            got = []
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                async with contextlib.aclosing(stream.read_frames(3, 1024, timeout=1.0)) as frames:
                    async for item in frames:
                        got.append(item)
            assert got == [b"only one"]
            assert loop.time() - started < 5.0
        finally:
            await stop(client, server)

        server, client, stream = await pair(closes)
        try:
            await stream.write_frame(b"go", timeout=10)
            got = []
            with pytest.raises(StreamClosed):
                async with contextlib.aclosing(stream.read_frames(3, 1024, timeout=10)) as frames:
                    async for item in frames:
                        got.append(item)
            assert got == [b"only one"]
        finally:
            await stop(client, server)

    asyncio.run(scenario())


def test_leaving_read_frames_early_cancels_the_reader():
    async def scenario() -> None:
        server, client, stream = await pair(serve_frames)
        try:
            await stream.write_frame(b"1000 1024", timeout=10)
            async with contextlib.aclosing(stream.read_frames(1000, 4096, timeout=30)) as frames:
                assert await anext(frames) == frame(0, 1024)
            # The reader stopped; the host is healthy and a new stream works.
            peer = server.peer_id
            fresh = await client.open_stream(peer, PROTOCOL, timeout=10)
            await fresh.write_frame(b"2 16", timeout=10)
            assert [f async for f in fresh.read_frames(2, 64, timeout=10)] == [frame(0, 16), frame(1, 16)]
        finally:
            await stop(client, server)

    asyncio.run(scenario())


def test_reads_cancelled_again_and_again_leave_the_connection_usable():
    """A read credits the sender's window by writing a frame; cancelled at that moment, the
    secured connection must not be left half way through a frame (the next one would fail
    to decrypt at the peer and every stream on the connection would die)."""

    async def scenario() -> None:
        server, client, _ = await pair(serve_frames)
        try:
            peer = server.peer_id
            for attempt in range(40):
                stream = await client.open_stream(peer, PROTOCOL, timeout=10)
                await stream.write_frame(b"64 65536", timeout=10)
                async with contextlib.aclosing(stream.read_frames(64, 1 << 17, timeout=30)) as frames:
                    for _ in range(1 + attempt % 5):
                        await anext(frames)
                await stream.reset()
            fresh = await client.open_stream(peer, PROTOCOL, timeout=10)
            await fresh.write_frame(b"3 65536", timeout=10)
            assert [f async for f in fresh.read_frames(3, 1 << 17, timeout=10)] == [frame(i, 65536) for i in range(3)]
        finally:
            await stop(client, server)

    asyncio.run(scenario())


def test_a_failing_callback_in_the_libp2p_thread_is_counted_and_the_host_lives_on():
    """trio ends its whole run when a ``run_sync_soon`` callback raises; ``run_soon`` must not
    let that happen (a frame queued just as the peer reset the stream once did exactly this)."""

    async def scenario() -> None:
        server, client, stream = await pair(serve_frames)
        try:
            client.run_soon(lambda: 1 / 0)
            await stream.write_frame(b"2 16", timeout=10)
            assert [f async for f in stream.read_frames(2, 64, timeout=10)] == [frame(0, 16), frame(1, 16)]
            assert client.stats.callback_errors == 1
            assert not client.done.done()
        finally:
            await stop(client, server)

    asyncio.run(scenario())


def test_a_frame_writer_bounds_its_queue_and_fails_once_the_stream_is_gone():
    sent: dict[str, object] = {}

    async def writer_side(stream: FramedStream) -> None:
        writer = stream.writer(max_pending_bytes=1 << 20)
        try:
            await stream.read_frame(64, timeout=10)
            # The client reads nothing more: the queue fills, then send must wait (and time out).
            with pytest.raises(TimeoutError):
                for _ in range(1000):
                    await writer.send(bytes(256 * 1024), timeout=2.0)
            sent["pending_bounded"] = writer._pending <= (1 << 20) + 256 * 1024 + 4
            await stream.reset()
            with pytest.raises((BridgeError, StreamClosed)):
                for _ in range(1000):
                    await writer.send(b"x" * 1024, timeout=2.0)
                    await writer.drain(timeout=2.0)
            sent["failed_after_reset"] = True
        finally:
            writer.close()
            sent["done"] = True

    async def scenario() -> None:
        server, client, stream = await pair(writer_side)
        try:
            await stream.write_frame(b"go", timeout=10)
            async with asyncio.timeout(30):
                while "done" not in sent:
                    await asyncio.sleep(0.05)
        finally:
            await stop(client, server)

    asyncio.run(scenario())
    assert sent.get("pending_bounded") is True
    assert sent.get("failed_after_reset") is True


def test_tcp_read_ahead_returns_the_bytes_in_order_and_never_more_than_asked():
    """py-libp2p's TCP reads, served from one large recv (``buffer_tcp_reads``), over a real
    socket pair: sizes as asked (or less at the end of what arrived), order kept, EOF as b""."""
    import trio
    from libp2p.io.trio import TrioTCPStream

    from node.libp2p.patches import TCP_READ_AHEAD_BYTES, buffer_tcp_reads

    buffer_tcp_reads()
    payload = os.urandom(3 * TCP_READ_AHEAD_BYTES + 1234)

    async def scenario() -> None:
        left, right = trio.socket.socketpair()
        writer, reader = trio.SocketStream(left), TrioTCPStream(trio.SocketStream(right))
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await writer.send_all(payload)
                await writer.aclose()

            nursery.start_soon(send)
            got = bytearray()
            sizes = [2, 65535, 0, 1, 300_000, 7]
            for index in range(10_000):
                n = sizes[index % len(sizes)]
                part = await reader.read(n)
                if n == 0:
                    assert part == b""
                    continue
                assert len(part) <= n
                if not part:
                    break
                got += part
            assert bytes(got) == payload
            assert await reader.read(10) == b""  # end of stream stays end of stream
            assert await reader.read(None) == b""

    trio.run(scenario)


def test_tcp_reads_count_the_bytes_that_were_waiting_for_them():
    """``tcp_read_fill`` over a real TCP connection on 127.0.0.1: a reader that lags behind its
    writer finds full buffers (the bytes were waiting); one that keeps up with a trickle finds
    what just came."""
    import trio
    from libp2p.io.trio import TrioTCPStream

    from node.libp2p.patches import TCP_READ_AHEAD_BYTES, buffer_tcp_reads, tcp_read_fill

    buffer_tcp_reads()

    async def transfer(pieces: int, piece: int, pause_s: float, lag_s: float) -> tuple[int, int]:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        writer = await trio.open_tcp_stream("127.0.0.1", port)
        reader = TrioTCPStream(await listeners[0].accept())
        before = tcp_read_fill()
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for _ in range(pieces):
                    await writer.send_all(os.urandom(piece))
                    await trio.sleep(pause_s)
                await writer.aclose()

            nursery.start_soon(send)
            await trio.sleep(lag_s)
            got = 0
            while part := await reader.read(TCP_READ_AHEAD_BYTES):
                got += len(part)
                await trio.sleep(lag_s / 100)  # a slow reader stays slow
            assert got == pieces * piece
        await listeners[0].aclose()
        after = tcp_read_fill()
        return after.bytes - before.bytes, after.waiting_bytes - before.waiting_bytes

    read, waiting = trio.run(transfer, 8, TCP_READ_AHEAD_BYTES, 0.0, 0.3)
    assert read == 8 * TCP_READ_AHEAD_BYTES and waiting >= read / 2, (read, waiting)
    read, waiting = trio.run(transfer, 20, 1024, 0.01, 0.0)
    assert read == 20 * 1024 and waiting == 0, (read, waiting)


def test_a_close_or_reset_the_peer_never_lets_finish_is_given_up_without_raising() -> None:
    """A frozen peer can leave our close (or reset) waiting on the connection: the daemon's
    callers (a fetch worker's cleanup) must not fail for it, so both give up after their limit."""
    async def idle(stream: FramedStream) -> None:
        await asyncio.sleep(30)

    async def hang(*args: object) -> None:
        await trio.sleep(60)

    async def scenario() -> list[float]:
        server, client, stream = await pair(idle)
        took = []
        try:
            stream._stream.close = hang  # what a write stuck behind a frozen peer's full window does
            stream._stream.reset = hang
            for end in (stream.close, stream.reset):
                started = time.monotonic()
                await end()
                took.append(time.monotonic() - started)
        finally:
            await stop(client, server)
        return took

    took = asyncio.run(scenario())
    assert all(4.0 < t < 15.0 for t in took), took
