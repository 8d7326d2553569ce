"""A Dagster group partition scored on the Ray cluster at ``$RAY_ADDRESS`` (run by ``tests/test_ray_scoring.py``
inside the cluster's network namespace).

    python -m tests.ray_group_run ROOT CHECKPOINT GROUP_SIZE

Registers the tars of ``<ROOT>/sources/cap`` (``group_size`` GROUP_SIZE) with ``tar_manifest``, then
materializes ``scores`` for the first group with ``scoring_model.executor = ray``; prints the run's outcome.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from unifilter_dagster.assets.tars import scores, tar_manifest
from unifilter_dagster.resources import ScoringModelResource, SourceConfig, UniFilterHome


def main(root: str, checkpoint: str, group_size: str) -> int:
    resources = {
        "home": UniFilterHome(root=root, use_world=False,
                              sources=[SourceConfig(name="cap", kind="caption", group_size=int(group_size))]),
        "duckdb": DuckDBResource(database=str(Path(root) / "unifilter.duckdb")),
        "scoring_model": ScoringModelResource(checkpoint=checkpoint, device="cpu", num_workers=0, batch_size=4,
                                              executor="ray", ray_address=os.environ["RAY_ADDRESS"], ray_workers=2),
    }  # fmt: skip
    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize([tar_manifest], resources=resources, instance=instance)
        (key,) = instance.get_dynamic_partitions("tars")
        result = dg.materialize([scores], resources=resources, instance=instance, partition_key=key)
        (mat,) = result.asset_materializations_for_node("scores")
        print(f"group {key}: success={result.success} tars={mat.metadata['tars'].value}")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
