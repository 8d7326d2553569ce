"""The ``tars`` dynamic partitions: one partition per input tar, keyed ``<source>_<NNNN>`` (design.md)."""

from __future__ import annotations

import zlib

import dagster as dg

TARS_PARTITIONS_NAME = "tars"
tars_partitions = dg.DynamicPartitionsDefinition(name=TARS_PARTITIONS_NAME)

# Run tag read by dagster.yaml's tag concurrency limits: one run per GPU id at a time.
GPU_TAG = "unifilter/gpu"
TRAINING_TAG = "unifilter/training"


def gpu_for_partition(partition_key: str, num_gpus: int) -> int:
    """A stable GPU id for a partition (crc32 of its key modulo the GPU count)."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    return zlib.crc32(partition_key.encode()) % num_gpus


def scoring_run_tags(partition_key: str, num_gpus: int) -> dict[str, str]:
    """Tags for a scoring run of one partition; empty when scoring on CPU (num_gpus == 0)."""
    if num_gpus <= 0:
        return {}
    return {GPU_TAG: str(gpu_for_partition(partition_key, num_gpus))}
