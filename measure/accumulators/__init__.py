"""Stateful accumulators (update / merge / compute), fed by the store engine and by ``compare``."""

from .base import Accumulator
from .cka import FEATURE_ROUTE_MAX_N, LinearCKA, LinearCKAMatrix, choose_route

__all__ = ["FEATURE_ROUTE_MAX_N", "Accumulator", "LinearCKA", "LinearCKAMatrix", "choose_route"]
