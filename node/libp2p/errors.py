"""The errors the libp2p layer raises to the asyncio side: ``BridgeError`` and its kinds."""

from __future__ import annotations


class BridgeError(RuntimeError):
    """A libp2p operation failed; ``str()`` says which and why."""


class StreamClosed(BridgeError):
    """The remote end closed or reset the stream before a whole frame arrived."""


class FrameTooLarge(BridgeError):
    """The peer announced a frame above the reader's limit."""


class ListenFailed(BridgeError):
    """The host could not listen on a configured address."""


class UnsupportedLibp2p(BridgeError):
    """The installed py-libp2p is not the release the layer's patches are written for."""
