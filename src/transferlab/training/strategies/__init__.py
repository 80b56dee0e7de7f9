"""The strategy registry: every transfer-learning method by name.

Adding a strategy is adding one module with a `Strategy` subclass and listing an instance here (or
calling `register()` from your own code); nothing else in transferlab branches on a strategy's name.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..config import TrainConfig
from .auto import Auto
from .base import FitContext, Strategy, Timings, TrainedModel
from .extract import Extract
from .finetune import Finetune
from .head import Head
from .scratch import Scratch

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Extract(), Head(), Finetune(), Scratch(),
                                                       Auto())}


def register(strategy: Strategy) -> Strategy:
    """Make `strategy` available by its name (train, compare, summary, the command line)."""
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy={name!r}: available strategies are {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def users_of() -> dict[str, list[str]]:
    """For each per-strategy option, the strategies that use it (for error messages)."""
    users: dict[str, list[str]] = {}
    for strategy in STRATEGIES.values():
        for option in sorted(strategy.uses):
            users.setdefault(option, []).append(strategy.name)
    return users


def configure(name: str, given: Mapping[str, Any]) -> tuple[Strategy, TrainConfig]:
    """The strategy called `name` and its resolved configuration for the `given` options."""
    strategy = get_strategy(name)
    return strategy, strategy.configure(given, users_of())


__all__ = ["STRATEGIES", "FitContext", "Strategy", "Timings", "TrainedModel", "TrainConfig",
           "configure", "get_strategy", "register", "users_of"]
