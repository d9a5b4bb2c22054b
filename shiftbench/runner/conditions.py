"""The conditions of a sweep: (split group, corruption, severity); clean is severity 0."""

from __future__ import annotations

from dataclasses import dataclass

CLEAN = "clean"


@dataclass(frozen=True, order=True)
class Condition:
    split: str
    corruption: str
    severity: int

    @property
    def key(self) -> str:
        """A stable file-system name, e.g. ``id/fog/3`` or ``ood/clean/0``."""
        return f"{self.split}/{self.corruption}/{self.severity}"

    @property
    def is_clean(self) -> bool:
        return self.corruption == CLEAN


def enumerate_conditions(groups: list[str], corrupted_groups: list[str], corruptions: list[str],
                         severities: list[int], clean: bool = True) -> list[Condition]:
    """Clean on every split group first, then corruption x severity on the corrupted groups."""
    conds = [Condition(g, CLEAN, 0) for g in groups] if clean else []
    conds += [Condition(g, c, s) for g in groups if g in corrupted_groups for c in corruptions for s in severities]
    return conds
