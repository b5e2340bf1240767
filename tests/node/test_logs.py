"""Log output: JSON lines off a terminal, level filtering, and library loggers kept quiet."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from node.logs import Repeats, configure_logging, get_logger


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_event_level_logger_timestamp_and_fields() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", out)  # a StringIO is no terminal, so auto means JSON
    log = get_logger("node.test")
    log.info("head adopted", round=3, head="b3:00ff")
    log.debug("not shown at info")
    try:
        raise ValueError("bad chunk")
    except ValueError:
        log.exception("fetch failed")

    first, second = _lines(out)
    assert first["event"] == "head adopted" and first["round"] == 3 and first["head"] == "b3:00ff"
    assert (first["level"], first["logger"]) == ("info", "node.test")
    assert str(first["timestamp"]).endswith("Z") and "T" in str(first["timestamp"])
    assert second["level"] == "error" and "ValueError: bad chunk" in str(second["exception"])


def test_stdlib_loggers_share_the_format_and_libp2p_is_kept_at_warning() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    logging.getLogger("libp2p.pubsub").info("mesh chatter")
    chatty_child = logging.getLogger("libp2p.network.auto_connector")
    chatty_child.setLevel(logging.INFO)  # py-libp2p does this to some of its own loggers
    chatty_child.info("initiating 198 new dials")
    logging.getLogger("libp2p.kad_dht").warning("Failed to read DHT message from stream: ")
    logging.getLogger("libp2p.network").warning("connection to peer lost")
    logging.getLogger("workloads.tiny").info("loaded %d samples", 64)
    assert [(line["logger"], line["event"]) for line in _lines(out)] == [
        ("libp2p.network", "connection to peer lost"),
        ("workloads.tiny", "loaded 64 samples"),
    ]


def test_debug_level_lets_library_debug_through() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    logging.getLogger("libp2p.pubsub").debug("mesh chatter")
    get_logger("node.test").debug("details", n=1)
    assert [line["event"] for line in _lines(out)] == ["mesh chatter", "details"]


def test_console_format_on_a_terminal_and_reconfiguring_replaces_the_handler() -> None:
    first, terminal = io.StringIO(), _Terminal()
    configure_logging("info", "json", first)
    configure_logging("warning", "auto", terminal)
    log = get_logger("node.test")
    log.info("filtered out")
    log.warning("peer lagging", peer="12D3KooW")
    assert first.getvalue() == ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", terminal.getvalue())  # colours, on a terminal
    assert "peer lagging" in text and "peer=12D3KooW" in text and "filtered out" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_unknown_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud", "json")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging("info", "xml")


def test_repeats_holds_back_the_same_fault_for_the_interval_and_counts_it() -> None:
    now = [0.0]
    repeats = Repeats(60.0, clock=lambda: now[0])
    assert repeats.due("OSError: disk full") == 0  # the first one goes out
    now[0] = 1.0
    assert repeats.due("OSError: disk full") is None  # the same again: held back
    assert repeats.due("OSError: read-only") == 0  # another fault goes out at once
    now[0] = 59.0
    assert repeats.due("OSError: disk full") is None
    now[0] = 61.0
    assert repeats.due("OSError: disk full") == 2  # out again, saying two were held back
    assert repeats.due("OSError: disk full") is None
    now[0] = 200.0
    assert repeats.due("OSError: disk full") == 1
    assert repeats.due("OSError: read-only") == 0
    now[0] = 201.0
    assert repeats.due("OSError: disk full") is None  # held back: remembered for ten intervals
    now[0] = 262.0
    assert repeats.due("OSError: read-only") == 0
    assert set(repeats._last) == {"OSError: disk full", "OSError: read-only"}
    now[0] = 801.0
    assert repeats.due("OSError: another") == 0
    assert set(repeats._last) == {"OSError: another"}  # the faults that stopped are forgotten
