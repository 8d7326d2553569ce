"""UniFilter core library: model, processing, data readers, scoring, training, catalog.

This package never imports dagster; ``unifilter_dagster`` wraps it as assets.
"""

__version__ = "0.1.0"
