"""Dagster assets for the UniFilter platform: ``dagster dev`` / ``dagster asset materialize -m unifilter_dagster``."""

from unifilter_dagster.definitions import defs

__all__ = ["defs"]
