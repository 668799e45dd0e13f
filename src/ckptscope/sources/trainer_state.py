"""The training log a Hugging Face `Trainer` saves with every checkpoint: `trainer_state.json`.

Its `log_history` is a list of entries, each a `step` and the scalars logged at it (`loss`,
`learning_rate`, `grad_norm`, `epoch`, `eval_*`, `num_input_tokens_seen`, ...); every
checkpoint holds the history up to its own step. The store keeps the union over a model's
checkpoints (table `training_log`), the latest checkpoint's value winning where two disagree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ckptscope.errors import SourceError

TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class TrainerState:
    """What a checkpoint's `trainer_state.json` adds to the store."""

    tokens: int | None  # num_input_tokens_seen at this checkpoint; None when the run did not count them
    log: dict[str, list]  # columns step, metric, value: one row per logged scalar per step


def read_trainer_state(path: Path) -> TrainerState | None:
    """The training log of the checkpoint directory `path`, or None when it has no trainer_state.json.

    Entries without an integer `step` and values that are not numbers (strings, lists, booleans)
    are skipped; within one file a later entry for the same step and metric wins, as the
    Trainer appends its history in order.
    """
    file = path / TRAINER_STATE
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{file}: not valid JSON; fix or remove it") from None
    if not isinstance(state, dict):
        raise SourceError(f"{file}: not a Trainer state (a JSON object with log_history); fix or remove it")
    values: dict[tuple[int, str], float] = {}
    history = state.get("log_history")
    for entry in history if isinstance(history, list) else ():
        step = entry.get("step") if isinstance(entry, dict) else None
        if not _is_int(step):
            continue
        for metric, value in entry.items():
            if metric != "step" and _is_number(value):
                values[(step, metric)] = float(value)
    log = {"step": [s for s, _ in values], "metric": [m for _, m in values], "value": list(values.values())}
    return TrainerState(_tokens(state, values), log)


def _tokens(state: dict, values: dict[tuple[int, str], float]) -> int | None:
    """Tokens seen at the checkpoint: the state's count, else the one logged at its step.

    A Trainer that does not count tokens (`include_num_input_tokens_seen` off) saves 0 at every
    step: that is "unknown", not zero, past step 0."""
    step = state.get("global_step")
    seen = state.get("num_input_tokens_seen")
    if _is_int(seen) and (seen > 0 or step == 0):
        return seen
    logged = values.get((step, "num_input_tokens_seen")) if _is_int(step) else None
    return int(logged) if logged is not None and math.isfinite(logged) and logged > 0 else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
