"""The one typed validation error that every decoder in ``protocol`` raises."""

from __future__ import annotations


class Invalid(ValueError):
    """Input that fails validation; ``reason`` is a short stable label used in counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
