"""Dataset descriptions and the microshard plan derived from them, identical on every peer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import canonical
from protocol.cid import content_id, is_content_id
from protocol.errors import Invalid

MAX_MICROSHARDS = 1_000_000


@dataclass(frozen=True)
class MicroshardSource:
    """One microshard as the workload describes it: its bytes' content id and its size."""

    data_cid: str
    examples: int
    tokens: int


@dataclass(frozen=True)
class DatasetDescription:
    """What a workload says about its dataset; its id is the content id of the canonical form."""

    name: str
    split: str
    microshards: tuple[MicroshardSource, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "microshards": [[m.data_cid, m.examples, m.tokens] for m in self.microshards],
        }

    @property
    def dataset_id(self) -> str:
        return content_id(canonical.encode(self.to_wire()))

    @property
    def examples(self) -> int:
        return sum(m.examples for m in self.microshards)

    @property
    def tokens(self) -> int:
        return sum(m.tokens for m in self.microshards)

    @classmethod
    def from_wire(cls, value: Any) -> DatasetDescription:
        if not isinstance(value, dict) or set(value) != {"name", "split", "microshards"}:
            raise Invalid("malformed", "dataset description needs exactly name, split, microshards")
        name, split, shards = value["name"], value["split"], value["microshards"]
        if not isinstance(name, str) or not isinstance(split, str) or not isinstance(shards, list):
            raise Invalid("malformed", "dataset description field types")
        if len(shards) > MAX_MICROSHARDS:
            raise Invalid("oversized", f"{len(shards)} microshards")
        parsed = []
        for item in shards:
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not is_content_id(item[0])
                or not all(type(n) is int and n >= 0 for n in item[1:])
            ):
                raise Invalid("malformed", f"bad microshard entry {item!r:.80}")
            parsed.append(MicroshardSource(item[0], item[1], item[2]))
        return cls(name, split, tuple(parsed))


@dataclass(frozen=True)
class Microshard:
    """A planned microshard: a stable id, its position in the dataset and its source."""

    id: str
    index: int
    source: MicroshardSource


def plan_microshards(description: DatasetDescription) -> tuple[Microshard, ...]:
    """The deterministic microshard plan: the same ids on every peer for the same description."""
    dataset_id = description.dataset_id
    return tuple(
        Microshard(
            id=content_id(canonical.encode([dataset_id, index, source.data_cid])),
            index=index,
            source=source,
        )
        for index, source in enumerate(description.microshards)
    )
