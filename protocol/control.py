"""Operator records: rollbacks that pin the canonical head, and patches that change settings."""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from protocol import canonical, fields
from protocol.cid import content_id
from protocol.errors import Invalid

MAX_REASON_LEN = 500

Setting = int | float | str


def is_operator(author: str, operator_ids: Collection[str]) -> bool:
    """Whether a record's author is one of the operator peer ids named in config."""
    return author in operator_ids


@dataclass(frozen=True)
class RollbackRecord:
    """An operator's order that the canonical chain restart from head ``target``."""

    target: str
    reason: str
    issued_ms: int

    @property
    def id(self) -> str:
        """The id heads built after this rollback carry as their ``rollback`` marker."""
        return content_id(canonical.encode(self.to_wire()))

    def to_wire(self) -> dict[str, Any]:
        return {"target": self.target, "reason": self.reason, "issued_ms": self.issued_ms}

    @classmethod
    def from_wire(cls, value: Any) -> RollbackRecord:
        wire = fields.record_map(value, ("target", "reason", "issued_ms"), "rollback")
        return cls(
            target=fields.cid(wire["target"], "target"),
            reason=fields.text(wire["reason"], "reason", MAX_REASON_LEN),
            issued_ms=fields.uint(wire["issued_ms"], "issued_ms"),
        )


def latest_rollback(rollbacks: Iterable[RollbackRecord]) -> RollbackRecord | None:
    """The rollback in force: the latest issued, ties broken by id so every peer agrees."""
    return max(rollbacks, key=lambda r: (r.issued_ms, r.id), default=None)


class Temperature(enum.Enum):
    """When a patched setting takes effect."""

    HOT = "hot"  # as soon as its effective round has begun, even mid-round: only this peer's work changes
    WARM = "warm"  # at the start of its effective round, on every peer alike: it enters heads or rounds
    COLD = "cold"  # only when the node restarts; no current setting needs this


@dataclass(frozen=True)
class SettingSpec:
    """A patchable setting: its type on the wire, its allowed range and when it applies."""

    temperature: Temperature
    kind: type
    check: Callable[[Any], bool]
    help: str


SETTINGS: Mapping[str, SettingSpec] = {
    "inner_lr": SettingSpec(
        Temperature.HOT, float, lambda v: 0.0 < v <= 1.0, "inner optimizer learning rate, (0, 1]"
    ),
    "inner_steps": SettingSpec(
        Temperature.WARM, int, lambda v: 1 <= v <= 1_000_000, "inner steps per round (H), [1, 1e6]"
    ),
    "outer_lr": SettingSpec(
        Temperature.WARM, float, lambda v: 0.0 < v <= 10.0, "outer (DiLoCo) learning rate, (0, 10]"
    ),
    "outer_momentum": SettingSpec(
        Temperature.WARM, float, lambda v: 0.0 <= v < 1.0, "outer Nesterov momentum, [0, 1)"
    ),
    "codec": SettingSpec(
        Temperature.HOT, str, lambda v: True, "pseudo-gradient codec label; each update names its own"
    ),
    "round_deadline_s": SettingSpec(
        Temperature.HOT, int, lambda v: 1 <= v <= 86_400, "longest a round waits, seconds, [1, 86400]"
    ),
}
MAX_SETTINGS = len(SETTINGS)


def _setting_to_wire(key: str, value: Setting) -> Setting:
    spec = SETTINGS.get(key)
    real = spec is not None and spec.kind is float and isinstance(value, (int, float))
    return fields.encode_real(float(value)) if real and not isinstance(value, bool) else value


def _setting_from_wire(key: str, value: Any) -> Setting:
    spec = SETTINGS.get(key)
    if spec is None:
        raise Invalid("unknown_setting", key[:40])
    parsed: Setting
    if spec.kind is float:
        parsed = fields.decode_real(value, key)
    elif spec.kind is int:
        parsed = fields.uint(value, key)
    else:
        parsed = fields.label(value, key)
    if not spec.check(parsed):
        raise Invalid("out_of_range", f"{key} = {parsed!r}")
    return parsed


@dataclass(frozen=True)
class PatchRecord:
    """An operator's change of settings from ``effective_round`` on; ``settings`` sorted by key."""

    settings: tuple[tuple[str, Setting], ...]
    effective_round: int
    issued_ms: int

    @classmethod
    def create(cls, settings: Mapping[str, Setting], effective_round: int, issued_ms: int) -> PatchRecord:
        """A patch from a plain mapping; Invalid for unknown keys or values out of range."""
        wire = {key: _setting_to_wire(key, value) for key, value in settings.items()}
        return cls.from_wire({"settings": wire, "effective_round": effective_round, "issued_ms": issued_ms})

    @property
    def id(self) -> str:
        return content_id(canonical.encode(self.to_wire()))

    def as_dict(self) -> dict[str, Setting]:
        return dict(self.settings)

    def to_wire(self) -> dict[str, Any]:
        return {
            "settings": {key: _setting_to_wire(key, value) for key, value in self.settings},
            "effective_round": self.effective_round,
            "issued_ms": self.issued_ms,
        }

    @classmethod
    def from_wire(cls, value: Any) -> PatchRecord:
        wire = fields.record_map(value, ("settings", "effective_round", "issued_ms"), "patch")
        settings = wire["settings"]
        keys = fields.sorted_keys(settings, "settings", MAX_SETTINGS)
        if not keys:
            raise Invalid("malformed", "a patch changes at least one setting")
        return cls(
            settings=tuple((key, _setting_from_wire(key, settings[key])) for key in keys),
            effective_round=fields.uint(wire["effective_round"], "effective_round"),
            issued_ms=fields.uint(wire["issued_ms"], "issued_ms"),
        )


def settings_at(
    base: Mapping[str, Setting], patches: Iterable[PatchRecord], round: int
) -> dict[str, Setting]:
    """The settings in force at ``round``: ``base`` with every patch effective by then applied in order.

    Order is effective round, then issue time, then id, so every peer applies
    the same patches the same way whatever order it received them in.
    """
    result = dict(base)
    due = [p for p in patches if p.effective_round <= round]
    for patch in sorted(due, key=lambda p: (p.effective_round, p.issued_ms, p.id)):
        result.update(patch.settings)
    return result


def earliest_warm_round(canonical_round: int) -> int:
    """The first round a warm setting may take effect at, seen from a peer whose canonical head is
    of ``canonical_round``: the next round may be under way on some peer already (it begins as soon
    as a peer holds the head before it), so every peer applies the setting alike only after that."""
    return canonical_round + 2


def check_warm_round(settings: Iterable[str], effective_round: int, canonical_round: int) -> None:
    """Refuse (Invalid ``too_soon``) a patch whose warm settings would take effect at a round that
    may already have begun somewhere: peers would split on it. Hot settings may take effect at once."""
    warm = sorted(k for k in settings if (spec := SETTINGS.get(k)) is not None and spec.temperature is Temperature.WARM)
    earliest = earliest_warm_round(canonical_round)
    if warm and effective_round < earliest:
        raise Invalid(
            "too_soon",
            f"{', '.join(warm)} must take effect at round {earliest} or later: round {earliest - 1} may be under way already",
        )
