"""The daemon's yamux writer (``wake_writers_on_credit``) and frame size, on two real hosts in
this process on 127.0.0.1: a writer whose send window is spent sleeps until the receiver's
credit arrives, where py-libp2p's looked again every 10 ms; a writer waiting for credit on a
stream the peer resets fails at once; a full frame fills whole noise messages."""

from __future__ import annotations

import asyncio
import os
import time
from types import CoroutineType
from typing import Any

import trio
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.security.noise.io import NoiseTransportReadWriter

from node.libp2p import BridgeError, FramedStream, Libp2pBridge
from tests.node.test_bridge_streams import pair

PAYLOAD = 1 << 20


class WriterSteps(trio.abc.Instrument):
    """Counts how often trio runs a task that is inside a yamux stream write."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        coro: Any = task.coro
        while isinstance(coro, CoroutineType):
            code = coro.cr_code
            if code.co_name == "_write_on_credit" or (code.co_name == "write" and "yamux" in code.co_filename):
                self.steps += 1
                return
            coro = coro.cr_await


async def instrument(bridge: Libp2pBridge, instrument: trio.abc.Instrument) -> None:
    async def add() -> None:
        trio.lowlevel.add_instrument(instrument)

    await bridge.call(add, timeout=5)


def beyond_credit(stream: FramedStream) -> bytes:
    """A payload larger than the credit the stream has (py-libp2p's receiver grows the window
    from 256 KiB while the protocol is negotiated): writing it must wait for more."""
    return os.urandom(int(stream._stream.muxed_stream.send_window) + PAYLOAD)


def test_a_writer_out_of_credit_sleeps_until_credit_arrives() -> None:
    async def scenario() -> tuple[bytes, bytes, int, float]:
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def slow_reader(stream: FramedStream) -> None:
            await asyncio.sleep(1.0)  # the writer spends its window and waits meanwhile
            received.set_result(await stream.read_frame(64 * PAYLOAD, timeout=10))

        server, client, stream = await pair(slow_reader)
        steps = WriterSteps()
        await instrument(client, steps)
        try:
            payload = beyond_credit(stream)
            started = time.monotonic()
            writing = asyncio.ensure_future(stream.write_frame(payload, timeout=20))
            await asyncio.sleep(0.2)  # by now the window is spent and the writer waits
            before = steps.steps
            await asyncio.sleep(0.6)  # the reader starts at 1.0 s
            while_waiting = steps.steps - before
            await writing
            took = time.monotonic() - started
            return payload, await asyncio.wait_for(received, 10), while_waiting, took
        finally:
            await client.stop()
            await server.stop()

    sent, got, steps_while_waiting, took = asyncio.run(scenario())
    assert got == sent
    assert took >= 0.9  # it did wait for the reader
    # py-libp2p's writer looks for credit every 10 ms: sixty looks in those 0.6 s, each
    # several task steps.
    assert steps_while_waiting == 0


def test_a_writer_waiting_for_credit_fails_as_soon_as_the_peer_resets_the_stream() -> None:
    async def scenario() -> tuple[BaseException | None, float]:
        async def resetter(stream: FramedStream) -> None:
            await asyncio.sleep(0.5)
            await stream.reset()

        server, client, stream = await pair(resetter)
        try:
            started = time.monotonic()
            error: BaseException | None = None
            try:
                await stream.write_frame(beyond_credit(stream), timeout=20)
            except BridgeError as exc:
                error = exc
            return error, time.monotonic() - started
        finally:
            await client.stop()
            await server.stop()

    error, took = asyncio.run(scenario())
    assert error is not None
    assert took < 4.0  # the reset wakes it; py-libp2p's own limit on waiting for credit is 5 s


def test_full_frames_fill_whole_noise_messages(monkeypatch) -> None:
    sizes: list[int] = []
    encrypt = NoiseTransportReadWriter.encrypt

    def recording(self: NoiseTransportReadWriter, data: bytes) -> bytes:
        sizes.append(len(data))
        return encrypt(self, data)

    async def scenario() -> None:
        async def reader(stream: FramedStream) -> None:
            await stream.read_frame(2 * PAYLOAD, timeout=10)

        server, client, stream = await pair(reader)
        try:
            monkeypatch.setattr(NoiseTransportReadWriter, "encrypt", recording)
            await stream.write_frame(os.urandom(PAYLOAD), timeout=20)
            await asyncio.sleep(0.5)
        finally:
            monkeypatch.undo()
            await client.stop()
            await server.stop()

    asyncio.run(scenario())
    full = sum(1 for size in sizes if size == NOISE_MAX_PLAINTEXT)
    partial = [size for size in sizes if size < NOISE_MAX_PLAINTEXT]
    # Both ends encrypt here (one process). The payload and its 4-byte length went out as 16
    # full messages and one short tail; credit updates are bare 12-byte yamux headers. Frames
    # of 256 KiB would add a 68-byte message to each of the four full frames. The hosts' own
    # protocols (identify, ping) may write a few hundred bytes meanwhile: those are not counted.
    assert full >= PAYLOAD // NOISE_MAX_PLAINTEXT
    assert len([size for size in partial if 12 < size < 200]) <= 1, partial[:20]
