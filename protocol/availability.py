"""Announce records: which artifacts a peer holds in full and which it is fetching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.cid import is_content_id
from protocol.errors import Invalid

ANNOUNCE_KIND = "announce"
ANNOUNCE_VERSION = 1
MAX_HOLDS = 256
MAX_FETCHING = 32


def _ids(value: Any, name: str, cap: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > cap or not all(is_content_id(v) for v in value):
        raise Invalid("malformed", f"{name} must list at most {cap} content ids")
    if value != sorted(set(value)):
        raise Invalid("malformed", f"{name} must be sorted and unique")
    return tuple(value)


@dataclass(frozen=True)
class Announce:
    """Manifests held with every chunk (``holds``) and manifests being fetched (``fetching``)."""

    holds: tuple[str, ...]
    fetching: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"holds": sorted(set(self.holds)), "fetching": sorted(set(self.fetching))}

    @classmethod
    def from_wire(cls, value: Any) -> Announce:
        if not isinstance(value, dict) or set(value) != {"holds", "fetching"}:
            raise Invalid("malformed", "announce needs exactly holds and fetching")
        return cls(_ids(value["holds"], "holds", MAX_HOLDS), _ids(value["fetching"], "fetching", MAX_FETCHING))
