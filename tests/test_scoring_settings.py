"""One scoring-settings object: the CLI and the Dagster resource build it, resolve() fills in the machine."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from unifilter_core.scoring.settings import (
    CPU_BATCH_SIZE,
    DEFAULT_BATCH_SIZE,
    ScoringSettings,
    SettingsError,
    default_workers,
)


def _cli_args(kind: str, *flags: str) -> argparse.Namespace:
    from unifilter_core.cli import build_parser

    parser = build_parser()
    return parser.parse_args(["score", kind, "--model-path", "m", "--tar-file-path", "t", *flags])


@pytest.mark.parametrize("kind", ["caption", "interleaved"])
def test_cli_and_resource_defaults_are_the_settings_defaults(kind: str) -> None:
    from unifilter_dagster.resources import ScoringModelResource

    defaults = ScoringSettings()
    assert ScoringSettings.from_values(_cli_args(kind)) == defaults
    assert ScoringSettings.from_values(ScoringModelResource()) == defaults
    # the same machine and kind give the same run settings through either door
    cli = ScoringSettings.from_values(_cli_args(kind)).resolve(kind, 0)
    assert cli == ScoringModelResource().settings(kind, "0")
    assert cli.batch_size == (DEFAULT_BATCH_SIZE if torch.cuda.is_available() else CPU_BATCH_SIZE)[kind]


def test_cli_help_states_the_settings_batch_default() -> None:
    from unifilter_core.cli.score_flags import _CPU_BATCH_HELP, _DEFAULT_BATCH_HELP

    assert _DEFAULT_BATCH_HELP == DEFAULT_BATCH_SIZE and _CPU_BATCH_HELP == CPU_BATCH_SIZE


def test_every_cli_scoring_flag_reaches_the_settings() -> None:
    args = _cli_args("caption", "--batch-size", "3", "--num-workers", "0", "--max-len", "300", "--packing", "on",
                     "--image-aspect-ratio", "square", "--vision-batch-size", "2", "--max-batch-tokens", "999",
                     "--dtype", "bfloat16", "--device", "cpu")  # fmt: skip
    settings = ScoringSettings.from_values(args).resolve("caption", 0)
    assert (settings.batch_size, settings.num_workers, settings.max_length) == (3, 0, 300)
    assert (settings.packing, settings.image_aspect_ratio, settings.vision_batch_size) == (True, "resize", 2)
    assert (settings.max_batch_tokens, settings.dtype, settings.device) == (999, "bfloat16", "cpu")
    config = settings.scoring_config()
    assert (config.batch_size, config.num_workers, config.max_batch_tokens) == (3, 0, 999)


def test_resolve_fills_in_the_machine() -> None:
    resolved = ScoringSettings(compile_vision="default").resolve("interleaved")
    if not torch.cuda.is_available():
        assert (resolved.device, resolved.dtype, resolved.compile_vision) == ("cpu", "float32", None)
    else:
        assert (resolved.device, resolved.dtype) == ("cuda", "bfloat16")
    assert resolved.batch_size == (4 if torch.cuda.is_available() else 2) and resolved.num_workers >= 1
    assert resolved.num_workers == default_workers(resolved.device)
    assert resolved.resolve("interleaved") == resolved  # resolving twice changes nothing
    with pytest.raises(ValueError, match="resolve"):
        ScoringSettings().scoring_config()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_a_gpu_that_is_not_here_is_refused() -> None:
    with pytest.raises(SettingsError, match="CUDA is not available") as info:
        ScoringSettings(device="cuda").resolve()
    assert info.value.field == "device"
    with pytest.raises(SettingsError, match="has 0"):
        ScoringSettings(device="cuda:1").resolve()


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"batch_size": 0}, "batch_size", "batch_size must be an int >= 1, got 0"),
        ({"num_workers": -1}, "num_workers", "num_workers must be an int >= 0, got -1"),
        ({"max_length": 2}, "max_length", "max_length must be an int >= 3, got 2"),
        ({"dtype": "fp8"}, "dtype", "dtype must be auto or one of"),
        ({"device": "tpu"}, "device", "device must be auto, cpu, cuda or cuda:N"),
        ({"packing": "sometimes"}, "packing", "packing must be on, off or auto"),
        ({"image_aspect_ratio": "stretch"}, "image_aspect_ratio", "image_aspect_ratio must be None"),
        ({"compile_vision": "fast"}, "compile_vision", "compile_vision must be one of"),
    ],
)
def test_bad_settings_name_their_field(values: dict, field: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        ScoringSettings(**values)
    assert info.value.field == field and str(info.value).startswith(message), str(info.value)


def test_cli_words_a_bad_setting_with_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from unifilter_core.cli import main

    for flags, line in [
        (["--max-len", "2"], "--max-len must be >= 3, got 2"),
        (["--vision-batch-size", "0"], "--vision-batch-size must be >= 1, got 0"),
    ]:
        code = main(["score", "caption", "--model-path", "m", "--tar-file-path", "t", *flags])
        err = capsys.readouterr().err
        assert code == 2 and line in err, err


def test_roles_split_load_score_and_speed_fields() -> None:
    base = ScoringSettings(device="cpu", dtype="float32").resolve("caption")
    faster = dataclasses.replace(base, batch_size=64, num_workers=3, vision_batch_size=1, max_batch_tokens=10)
    assert faster.load_key() == base.load_key() and faster.score_settings() == base.score_settings()
    stretched = dataclasses.replace(base, image_aspect_ratio="resize")
    assert stretched.load_key() == base.load_key() and stretched.score_settings() != base.score_settings()
    half = dataclasses.replace(base, dtype="bfloat16")
    assert half.load_key() != base.load_key() and half.score_settings() != base.score_settings()


def test_resource_loads_the_model_once_per_run(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    """Settings that leave the weights alone reuse the run's model; the run's end releases it."""
    import dagster as dg

    import unifilter_core.scorer as scorer_module
    from unifilter_dagster.resources import ScoringModelResource

    loads = []
    real = scorer_module.load_scorer

    def counting(*args, **kwargs):
        loads.append(kwargs.get("settings"))
        return real(*args, **kwargs)

    monkeypatch.setattr(scorer_module, "load_scorer", counting)
    resource = ScoringModelResource(checkpoint=str(tiny_checkpoint), device="cpu", num_workers=0)
    with dg.build_resources({"model": resource}) as built:
        model_resource = built.model
        first = model_resource.load(tmp_path, model_resource.settings("caption"))
        again = model_resource.load(tmp_path, model_resource.settings("caption"))
        docs = model_resource.load(tmp_path, model_resource.settings("interleaved"))
        assert again is first and len(loads) == 1
        assert docs.model is first.model and docs.options.batch_size == 2 and len(loads) == 1  # CPU default
        stretched = model_resource.load(
            tmp_path, dataclasses.replace(model_resource.settings("caption"), image_aspect_ratio="resize")
        )
        assert stretched.model is first.model and stretched.processor.config.image_aspect_ratio == "resize"
        assert len(loads) == 1
    assert model_resource._loaded == {}  # released with the run
    with pytest.raises(ValueError, match="another model load"):
        first.with_settings(dataclasses.replace(first.options, dtype="bfloat16"))


def test_default_workers_follow_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import unifilter_core.cpus as cpus

    for cores, cpu_workers, gpu_workers in ((1, 1, 1), (2, 2, 1), (4, 3, 3), (16, 15, 15)):
        monkeypatch.setattr(cpus, "available_cpus", lambda n=cores: n)
        assert default_workers("cpu") == cpu_workers and default_workers("cuda:0") == gpu_workers
