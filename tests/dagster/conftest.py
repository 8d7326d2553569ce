"""Fixtures of the Dagster tests.

* ``template`` (session): the tiny trained world of :mod:`tests.dagster.world`, built through the assets
  (stage 1 and stage 2 really train, 2 steps each); read-only.
* ``world``: a private copy of it for one test (data root + Dagster home with the repository's dagster.yaml).
* ``instance``: a Dagster instance on that copy's home (closed after the test).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dagster.world import World, build_template, copy_world


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_template(tmp_path_factory.getbasetemp() / "unifilter-dagster-template")


@pytest.fixture
def world(template: World, tmp_path: Path) -> World:
    return copy_world(template, tmp_path)


@pytest.fixture
def instance(world: World) -> Iterator[Any]:
    with world.instance() as inst:
        yield inst
