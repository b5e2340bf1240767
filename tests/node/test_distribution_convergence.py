"""Convergence of heads across real daemons: a consumer that joins late is reported lagging, then converged.

Runs on the session's shared frozen-layer swarm of two trainers (see test_distribution) and
adds its own consumer, which fetches one request at a time in small batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from protocol.identity import SigningKey
from tests.node.test_distribution import (
    HEARTBEAT_S,
    consumer_toml,
    distribution_swarm,
    logs_on_failure,
    training,
)
from tests.swarm_harness import ONE_THREAD, Swarm, wait_until

pytestmark = pytest.mark.slow

UNKNOWN_HEAD = "b3:" + "0" * 64
SLOW_FETCHES = '\n[exchange]\nstreams_per_provider = 1\nbatch_bytes = 4096\n'


SHARED_SWARMS = ("distribution",)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    swarm = distribution_swarm(tmp_path_factory)
    yield swarm  # stopped by tests/node/conftest.py once no following module shares it


def test_late_consumer_is_reported_lagging_then_converged(swarm: Swarm) -> None:
    trainer, other = swarm.peers[0], swarm.peers[1]
    consumer = swarm.add(consumer_toml() + SLOW_FETCHES, heartbeat_s=HEARTBEAT_S)
    consumer.start(extra_env=ONE_THREAD)
    with logs_on_failure(swarm):

        def lagging_row() -> tuple[dict[str, Any], dict[str, Any]] | None:
            head = training(trainer).get("head")
            report = trainer.get(f"/convergence/{head}") if head else None
            for row in (report or {}).get("lagging", []):
                if row["peer_id"] == consumer.peer_id and row["reason"] in ("fetching", "behind"):
                    return report, row
            return None

        # From its first heartbeat until it has fetched the swarm's head, the consumer lags.
        report, row = wait_until(lagging_row, 90, interval=0.05, what="the consumer reported as lagging")
        assert report["converged"] is False
        assert consumer.peer_id not in report["holder_ids"]
        assert row["round"] < report["round"] and row["head"] != report["head"]
        if row["reason"] == "fetching":
            assert row["fetch"]["manifest"].startswith("b3:")
        print(f"lagging: {row['reason']} at round {row['round']} of {report['round']}")

        # Then it holds the same head as both trainers: the head has converged.
        def converged() -> dict[str, Any] | None:
            head = training(trainer).get("head")
            report = trainer.get(f"/convergence/{head}") if head else None
            if report and report["converged"] and consumer.peer_id in report["holder_ids"]:
                return report
            return None

        report = wait_until(converged, 60, interval=0.05, what="the head converged, held by the consumer")
        assert {trainer.peer_id, consumer.peer_id} <= set(report["holder_ids"])
        assert report["holders"] == len(report["holder_ids"]) >= 2
        assert report["heads_held"].get(report["head"], 0) == report["holders"]
        assert not [r for r in report["lagging"] if r["reason"] != "offline"]

        # The consumer's own status as another peer's heartbeats tell it.
        def node_view() -> dict[str, Any] | None:
            view = other.get(f"/nodes/{consumer.peer_id}")
            return view if view and view["round"] >= 1 else None

        view = wait_until(node_view, 20, what="/nodes/{consumer} from the other trainer")
        assert view["peer_id"] == consumer.peer_id and view["role"] == "consumer" and view["alive"] is True
        assert view["head"].startswith("b3:") and view["phase"] in ("following", "evaluating", "syncing")
        assert set(view["fetch"]) == {"manifest", "progress", "rate_bytes_per_s", "bytes_left", "error"}
        own = trainer.get(f"/nodes/{trainer.peer_id}")
        assert own["peer_id"] == trainer.peer_id and own["role"] == "trainer" and own["alive"] is True

        # Holders of a head, as the peer sees them: the consumer among them once it holds it.
        def holders() -> dict[str, Any] | None:
            head = training(consumer).get("head")
            body = trainer.get(f"/heads/{head}/holders") if head else None
            return body if body and consumer.peer_id in body["holders"] else None

        body = wait_until(holders, 30, interval=0.05, what="/heads/{id}/holders naming the consumer")
        assert body["head"].startswith("b3:")

        # Unknown ids answer 404, malformed ones 400, both as JSON errors.
        stranger = SigningKey.generate().peer_id
        for path, expected in (
            (f"/nodes/{stranger}", 404),
            ("/nodes/not-a-peer-id", 400),
            (f"/convergence/{UNKNOWN_HEAD}", 404),
            ("/convergence/b3:nothex", 400),
            (f"/heads/{UNKNOWN_HEAD}/holders", 404),
            ("/heads/12345/holders", 400),
        ):
            status, error = trainer.request("GET", path)
            assert status == expected, (path, status, error)
            assert isinstance(error, dict) and isinstance(error.get("error"), str), (path, error)
