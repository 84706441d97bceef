"""Panel rules, free of I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from csx.types.v1 import types_pb2


@dataclass(frozen=True, slots=True)
class PlaceMention:
    place_id: str
    context_type: int


def place_mentions(contexts: Iterable[types_pb2.ContextLink]) -> list[PlaceMention]:
    """One mention per place, in the order given: a concern naming a place twice (say as a school
    and a neighbourhood) is still one concern about it, and the first context type wins."""
    seen: dict[str, PlaceMention] = {}
    for link in contexts:
        seen.setdefault(link.place_id, PlaceMention(link.place_id, link.context_type))
    return list(seen.values())


def reaches_threshold(child_count: int, threshold: int, already_flagged: bool) -> bool:
    """Flag once: the first time the distinct children at a place reach the threshold."""
    return not already_flagged and child_count >= threshold
