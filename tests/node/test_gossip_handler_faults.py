"""A record handler that fails the same way over and over (a full disk) is counted every time, logged once a minute."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from node.daemon import NODE_RECORDS
from node.gossip import Gossip
from node.libp2p import Libp2pBridge
from node.logs import configure_logging
from protocol.identity import SigningKey
from protocol.kinds import record_kinds
from protocol.membership import HEARTBEAT_KIND, Heartbeat
from protocol.records import Record, sign_record


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_same_handler_fault_is_logged_once_with_its_repeats_counted() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    author = SigningKey.generate()

    async def on_heartbeat(record: Record) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", f"/data/store/tmp-{record.id[3:11]}")

    async def deliver() -> tuple[int, int]:
        key = SigningKey.generate()
        bridge = Libp2pBridge(key.seed, ["/ip4/127.0.0.1/tcp/0"], kademlia=False)
        await bridge.start()
        try:
            gossip = Gossip(bridge, key, "g", record_kinds(NODE_RECORDS))
            gossip.on(HEARTBEAT_KIND, on_heartbeat)
            delivered = 0
            for seq in range(1, 31):
                beat = Heartbeat(author.peer_id, (), "t", seq, "trainer", 1000).to_wire()
                raw = sign_record(author, HEARTBEAT_KIND, 1, "g", beat, int(time.time() * 1000))
                delivered += await gossip.handle_message(raw, author.peer_id) is not None
            return delivered, gossip.handler_errors
        finally:
            await bridge.stop()

    delivered, errors = asyncio.run(deliver())
    assert delivered == errors == 30  # every failure still counts (status port, metrics)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [r for r in records if r["event"] == "record_handler_failed"]
    assert len(failed) == 1, failed
    assert failed[0]["kind"] == HEARTBEAT_KIND and failed[0]["repeated"] == 0
    assert "No space left on device" in failed[0]["exception"]
