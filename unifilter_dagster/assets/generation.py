"""Training inputs: synthetic (example, quality level) pairs and the LLaVA-Pretrain caption subset."""

from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from unifilter_core import paths
from unifilter_dagster.assets._meta import CODE_VERSION, record, scalar_metadata, timed
from unifilter_dagster.resources import ClaudeResource, UniFilterHome


def _generate_pairs(
    kind: str,
    context: dg.AssetExecutionContext,
    home: UniFilterHome,
    claude: ClaudeResource,
    duckdb: DuckDBResource,
) -> dg.MaterializeResult:
    from unifilter_core.synth.claude_sources import MissingWorldImagesError, SourceSpec
    from unifilter_core.synth.generate import generate_pairs

    root = home.root_path
    out = paths.synthetic_dir(root, kind)
    with timed() as timing:
        try:
            if claude.backend == "claude":
                spec = SourceSpec(
                    claude.source_type, Path(claude.source_path) if claude.source_path else None
                )
                settings = {"source": spec, "claude_config": claude.claude_config(), "limit": claude.limit}
            else:
                settings = {"world_config": home.world.to_world_config()}
            result = generate_pairs(claude.backend, kind, out, data_root=root, **settings)
        except MissingWorldImagesError as exc:
            raise dg.Failure(f"{exc}: materialize llava_pretrain_subset first (the world's images)") from exc
        if result.world_pairs_moved_to is not None:
            context.log.info(f"world pairs moved from {out} to {result.world_pairs_moved_to}")
    catalog = home.catalog(duckdb)
    if result.ledger_path is not None:
        catalog.ingest_ledger(result.ledger_path, kind=kind)
    record(catalog, context, timing, rows=result.records)
    return dg.MaterializeResult(
        metadata={
            "backend": result.backend,
            "path": dg.MetadataValue.path(str(out)),
            "records": result.records,
            "seconds": timing["seconds"],
            **scalar_metadata(result.summary),
        }
    )


@dg.asset(group_name="training_data", code_version=CODE_VERSION, kinds={"python", "json"})
def synthetic_caption_pairs(
    context: dg.AssetExecutionContext, home: UniFilterHome, claude: ClaudeResource, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """Caption (image, text, level 0..3) pairs in UniFilter training JSON: Claude-written or from the world."""
    return _generate_pairs("caption", context, home, claude, duckdb)


@dg.asset(group_name="training_data", code_version=CODE_VERSION, kinds={"python", "json"})
def synthetic_interleaved_pairs(
    context: dg.AssetExecutionContext, home: UniFilterHome, claude: ClaudeResource, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """Interleaved-document pairs at 4 quality levels: Claude-written or from the world."""
    return _generate_pairs("interleaved", context, home, claude, duckdb)


class LlavaPretrainConfig(dg.Config):
    """Where the LLaVA-Pretrain set comes from: the world (default) or a real download."""

    json_path: str | None = None  # blip_laion_cc_sbu_558k.json of a real download
    images: str | None = None  # its image folder or images.zip
    subset_size: int | None = None  # records to keep (None = all valid)
    seed: int = 0


@dg.asset(group_name="training_data", code_version=CODE_VERSION, kinds={"python", "json"})
def llava_pretrain_subset(
    context: dg.AssetExecutionContext,
    config: LlavaPretrainConfig,
    home: UniFilterHome,
    duckdb: DuckDBResource,
) -> dg.MaterializeResult:
    """The LLaVA-Pretrain 558K-format caption set stage 1 trains on (validated; a subset when configured)."""
    out = paths.pretrain_dir(home.root_path)
    with timed() as timing:
        if config.json_path:
            from unifilter_core.pretrain import prepare_llava_subset

            if not config.images:
                raise ValueError(
                    "llava_pretrain_subset: `images` (folder or images.zip) is required with json_path"
                )
            summary = prepare_llava_subset(
                config.json_path, config.images, out, subset_size=config.subset_size, seed=config.seed
            )
            summary["records_read"] = summary.pop("records")
            rows = summary["kept"]
        else:
            from unifilter_core.synth import write_llava_pretrain

            world = home.world.to_world_config()
            summary = write_llava_pretrain(out, world)
            rows = int(summary.get("records", 0))
    record(home.catalog(duckdb), context, timing, rows=rows)
    return dg.MaterializeResult(
        metadata={**scalar_metadata(summary), "path": dg.MetadataValue.path(str(out)), "records": rows}
    )
