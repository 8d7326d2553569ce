"""A tiny trained world for the Dagster tests, built once per pytest session through the assets themselves.

:func:`build_template` materializes the upstream graph (world data, LLaVA-Pretrain set, stage 1, stage 2 with
``max_steps=2``, tar_manifest) on a tiny world into ``<base>/root`` with a real Dagster instance in
``<base>/dagster_home`` (the repository's ``dagster.yaml``). It is idempotent: a second call (e.g. from the
browser tests' fixture) reuses the finished template. :func:`copy_world` gives each test its own copy, so tests
can score, rescore and filter without seeing each other.

The template: 3 tar partitions (``datacomp_0000``, ``datacomp_0001``, ``obelics_0000``); ``add_tar_42`` copies
the obelics tar to ``sources/obelics/00000042.tar`` (partition ``obelics_0042``), the issue's example.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unifilter_dagster.demo import UPSTREAM  # the assets a scoring run needs, as the demo materializes them

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY_WORLD: dict[str, int] = {
    "train_images": 40,
    "val_images": 12,
    "train_documents": 10,
    "val_documents": 6,
    "pretrain_images": 30,
    "caption_tars": 2,
    "caption_tar_samples": 24,
    "interleaved_tars": 1,
    "interleaved_tar_docs": 8,
}
STAGE1_OVERRIDES = ["max_steps=2", "logging_steps=1", "per_device_train_batch_size=8"]
STAGE2_OVERRIDES = [*STAGE1_OVERRIDES, "per_device_eval_batch_size=64"]
TEMPLATE_PARTITIONS = ["datacomp_0000", "datacomp_0001", "obelics_0000"]
_READY = "template-ready.json"


@dataclass(frozen=True)
class World:
    """A data root and a Dagster home (``DAGSTER_HOME``) holding the repository's ``dagster.yaml``."""

    root: Path
    home: Path
    run_id: str = ""

    def resources(self, **overrides: Any) -> dict[str, Any]:
        """The platform's resources rooted here (the tiny world sizes), with ``overrides`` by name."""
        from unifilter_dagster.resources import default_resources

        return {**default_resources(str(self.root), world=TINY_WORLD), **overrides}

    def instance(self) -> Any:
        """A Dagster instance on this Dagster home (close it, or use it as a context manager)."""
        import dagster as dg

        return dg.DagsterInstance.from_config(str(self.home))

    def catalog(self) -> Any:
        from unifilter_core.catalog import Catalog

        return Catalog(root=self.root)

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (CLI, ``dagster dev``): this root and Dagster home, no stray key."""
        env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY",)}
        env.update(
            UNIFILTER_HOME=str(self.root),
            DAGSTER_HOME=str(self.home),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=str(REPO_ROOT),
            OMP_NUM_THREADS="1",
        )
        return env

    def add_tar_42(self) -> Path:
        """``sources/obelics/00000042.tar``: a copy of the obelics tar, so partition ``obelics_0042`` exists."""
        src = self.root / "sources" / "obelics" / "00000000.tar"
        dest = src.with_name("00000042.tar")
        shutil.copyfile(src, dest)
        return dest


def new_dagster_home(path: Path) -> Path:
    """A Dagster home holding a copy of the repository's ``dagster.yaml``."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", path / "dagster.yaml")
    return path


def build_template(base: Path) -> World:
    """Materialize the upstream graph on the tiny world once (reused when ``base`` already holds it)."""
    import dagster as dg

    from unifilter_dagster.definitions import ALL_ASSETS

    ready = base / _READY
    if ready.is_file():
        return World(base / "root", base / "dagster_home", json.loads(ready.read_text())["run_id"])
    if base.exists():
        shutil.rmtree(base)
    world = World(base / "root", new_dagster_home(base / "dagster_home"))
    world.root.mkdir(parents=True)
    run_config = {
        "ops": {
            "stage1_projector": {"config": {"overrides": STAGE1_OVERRIDES}},
            "stage2_classifier": {"config": {"overrides": STAGE2_OVERRIDES, "min_accuracy": 0.0}},
        }
    }
    with world.instance() as instance:
        result = dg.materialize(
            ALL_ASSETS,
            selection=UPSTREAM,
            resources=world.resources(),
            instance=instance,
            run_config=run_config,
            raise_on_error=True,
        )
    ready.write_text(json.dumps({"run_id": result.run_id}))
    return World(world.root, world.home, result.run_id)


def copy_world(template: World, dest: Path) -> World:
    """A private copy of the template (data root and Dagster home) under ``dest``."""
    shutil.copytree(template.root, dest / "root", symlinks=True)
    shutil.copytree(template.home, dest / "dagster_home", symlinks=True)
    return World(dest / "root", dest / "dagster_home", template.run_id)


def run_cli(args: list[str], world: World, *, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a console script of the venv (``dagster ...``) in the repository root with the world's env."""
    cmd = [str(BIN / args[0]), *args[1:]]
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=world.env(), capture_output=True, text=True, timeout=timeout, check=False
    )
