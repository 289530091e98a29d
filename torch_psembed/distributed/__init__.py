"""Sharding tables across torchrun ranks (placeholder until the distributed issue lands)."""

from .runtime import init, is_initialized, shutdown

__all__ = ["init", "shutdown", "is_initialized"]
