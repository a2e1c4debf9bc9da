"""Plain values that pass between the Optuna side and the rest: one trial as recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The prune reason of a config refused before any training (shape check, config rules).
REJECTED = "rejected before training"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as plain values."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING or WAITING
    params: dict[str, Any]
    value: float | None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        return self.attrs.get("mlflow_run_id")

    @property
    def n_params(self) -> int | None:
        return self.attrs.get("n_params")

    @property
    def macs(self) -> int | None:
        return self.attrs.get("macs")

    @property
    def history(self) -> dict[str, list[float]] | None:
        return self.attrs.get("history")

    @property
    def rejected(self) -> bool:
        """Pruned before any training (a config the shape check refused), as opposed to
        stopped by the pruner."""
        return str(self.attrs.get("prune_reason", "")).startswith(REJECTED)
