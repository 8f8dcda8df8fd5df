"""Strategies and their registry; importing this package registers every family."""

from . import jacobian as _jacobian  # noqa: F401  (registers the first-order strategies)
from .registry import BATCH_INDEPENDENT, VMAP, Strategy, all_strategies, for_op, get, heuristic, names, register

__all__ = ["BATCH_INDEPENDENT", "VMAP", "Strategy", "all_strategies", "for_op", "get", "heuristic", "names", "register"]
