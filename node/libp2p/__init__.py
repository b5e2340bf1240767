"""The libp2p layer: the only code that imports trio or libp2p.

Layers, each importing only those above it:

- ``errors``: ``BridgeError`` and its kinds, raised to the asyncio side.
- ``faults``: remote peers' faults the inbound-stream guards contain, counted and logged.
- ``patches``: every process-wide change to py-libp2p's internals, behind one ``apply()``
  that first checks the installed release (docs/libp2p-patches.md).
- ``trio_thread``: tasks in the trio thread whose outcomes settle asyncio futures.
- ``framing``: length-prefixed frames on a stream (``FramedStream``, ``FrameWriter``).
- ``publisher_rate``: the per-publisher token buckets gossip relaying is checked against.
- ``bridge``: ``Libp2pBridge``, the host in its trio thread, composing all of the above.
"""

from node.libp2p.bridge import BridgeStats, GossipMessage, GossipSettings, Libp2pBridge
from node.libp2p.errors import BridgeError, FrameTooLarge, ListenFailed, StreamClosed, UnsupportedLibp2p
from node.libp2p.framing import FramedStream, FrameWriter, StreamHandler, frame_prefix
from node.libp2p.patches import TcpReadFill
from node.libp2p.publisher_rate import PublisherRate, Verdict
from node.libp2p.trio_thread import mark_retrieved

__all__ = [
    "BridgeError",
    "BridgeStats",
    "FrameTooLarge",
    "FrameWriter",
    "FramedStream",
    "GossipMessage",
    "GossipSettings",
    "Libp2pBridge",
    "ListenFailed",
    "PublisherRate",
    "StreamClosed",
    "StreamHandler",
    "TcpReadFill",
    "UnsupportedLibp2p",
    "Verdict",
    "frame_prefix",
    "mark_retrieved",
]
