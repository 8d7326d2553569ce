"""Bad configuration: one clear error each, raised before any work starts and before any output is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.reliability.conftest import failure_message, files_under, make_resources, materialize
from tests.tarfixtures import write_caption_tar

QWEN2_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64}
CLIP_CONFIG = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512}


@pytest.fixture
def bad_checkpoints(tmp_path: Path, rel_ckpt: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint folder, a regex the error must match)."""
    no_weights = tmp_path / "no_weights"
    shutil.copytree(rel_ckpt, no_weights)
    (no_weights / "model.safetensors").unlink()
    qwen2 = tmp_path / "qwen2"
    qwen2.mkdir()
    (qwen2 / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    clip = tmp_path / "clip"
    shutil.copytree(rel_ckpt, clip)  # weights and tokenizer present: only the config says "not ours"
    (clip / "config.json").write_text(json.dumps(CLIP_CONFIG))
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing": (tmp_path / "does-not-exist", r"does not exist"),
        "empty": (empty, r"no config\.json"),
        "no_weights": (no_weights, r"no model\.safetensors"),
        "qwen2": (qwen2, r"model_type 'qwen2'.*expected 'llava_qwen'"),
        "clip": (clip, r"model_type 'clip'.*expected 'llava_qwen'"),
    }


CASES = ["missing", "empty", "no_weights", "qwen2", "clip"]


def _copy_with(tmp_path: Path, ckpt: Path, name: str, **files: bytes) -> Path:
    """A copy of ``ckpt`` with some files replaced by raw bytes (keys: file names with ``_`` for ``.``)."""
    out = tmp_path / name
    shutil.copytree(ckpt, out)
    for key, data in files.items():
        (out / key.replace("_", ".", 1).replace("_", ".")).write_bytes(data)
    return out


def _edited_config(ckpt: Path, **changes) -> bytes:
    raw = json.loads((ckpt / "config.json").read_text())
    return json.dumps({**raw, **changes}).encode()


@pytest.fixture
def bad_checkpoint_files(tmp_path: Path, rel_ckpt: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (checkpoint folder, file the message must name, a regex the error must match)."""
    weights = (rel_ckpt / "model.safetensors").read_bytes()
    vocab = json.loads((rel_ckpt / "config.json").read_text())["vocab_size"]
    config_cases = {
        "config_list": (b"[]", r"holds a JSON list, not an object"),
        "config_string": (b'"llava_qwen"', r"holds a JSON str, not an object"),
        "config_garbage": (b"\x00\xffnot json{", r"is not a readable JSON file"),
        "config_empty": (b"", r"is not a readable JSON file"),
        "vocab_below_pad": (_edited_config(rel_ckpt, vocab_size=100), r"pad_token_id=\d+ does not fit vocab_size=100"),
        "eos_out_of_range": (_edited_config(rel_ckpt, eos_token_id=vocab), rf"eos_token_id={vocab} does not fit"),
        "tokenizer_out_of_range": (
            _edited_config(rel_ckpt, vocab_size=200, pad_token_id=0, bos_token_id=1, eos_token_id=2),
            r"tokenizer in .*: tokenizer bos=\d+ does not fit vocab_size=200",
        ),
    }  # fmt: skip
    weight_cases = {
        "weights_empty": (b"", r"is not a readable safetensors file \(empty"),
        "weights_garbage": (
            b"this is not a safetensors file at all" * 4,
            r"is not a readable safetensors file",
        ),
        "weights_truncated": (weights[: len(weights) // 2], r"truncated or corrupt"),
        "weights_header_only": (weights[:8], r"is not a readable safetensors file"),
    }
    out = {}
    for name, (data, pattern) in config_cases.items():
        out[name] = (_copy_with(tmp_path, rel_ckpt, name, config_json=data), "config.json", pattern)
    for name, (data, pattern) in weight_cases.items():
        out[name] = (
            _copy_with(tmp_path, rel_ckpt, name, model_safetensors=data),
            "model.safetensors",
            pattern,
        )
    return out


FILE_CASES = [
    "config_list",
    "config_string",
    "config_garbage",
    "config_empty",
    "vocab_below_pad",
    "eos_out_of_range",
    "tokenizer_out_of_range",
    "weights_empty",
    "weights_garbage",
    "weights_truncated",
    "weights_header_only",
]


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_checkpoint_files_are_one_value_error(
    bad_checkpoint_files, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each broken file is one ValueError naming the file and the repair, raised before weights are used."""
    import re

    from unifilter_core.modeling import modeling_unifilter
    from unifilter_core.scorer import load_scorer

    path, file_name, pattern = bad_checkpoint_files[case]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from a checkpoint with a broken file")

    monkeypatch.setattr(modeling_unifilter, "UniFilterModel", no_model)  # what every model build constructs
    with pytest.raises(ValueError) as info:
        load_scorer(path)
    message = str(info.value)
    assert re.search(pattern, message), message
    assert file_name in message and ("re-download" in message or "save_pretrained" in message), message
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), "chained"


@pytest.mark.parametrize("case", CASES)
def test_load_scorer_bad_checkpoints(bad_checkpoints, case: str) -> None:
    from unifilter_core.scorer import load_scorer

    path, pattern = bad_checkpoints[case]
    with pytest.raises(ValueError, match=pattern):
        load_scorer(path)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"batch_size": -1}, r"batch_size must be an int >= 1, got -1"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"dtype": "float64"}, r"dtype"),
        ({"image_aspect_ratio": "stretch"}, r"image_aspect_ratio"),
    ],
)
def test_load_scorer_bad_options_fail_before_weights(
    rel_ckpt: Path, options: dict, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unifilter_core.modeling import UniFilterForQualityScoring
    from unifilter_core.scorer import load_scorer

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(UniFilterForQualityScoring, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=pattern):
        load_scorer(rel_ckpt, **options)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from unifilter_core.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES)
def test_cli_score_bad_checkpoint(tmp_path: Path, bad_checkpoints, case: str, capsys) -> None:
    path, pattern = bad_checkpoints[case]
    write_caption_tar(tmp_path / "tars" / "00000000.tar", n=2)
    out = tmp_path / "out"
    argv = ["score", "caption", "--model-path", str(path), "--tar-file-path", str(tmp_path / "tars"),
            "--output-dir", str(out), "--num-workers", "0"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unifilter: error:"), err
    import re

    assert re.search(pattern, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--batch-size", "-1"], r"--batch-size must be >= 1, got -1"),
        (["--batch-size", "0"], r"--batch-size must be >= 1"),
        (["--num-workers", "-2"], r"--num-workers must be >= 0"),
        (["--tar-file-path", "/nonexistent/tars"], r"does not exist"),
    ],
)
def test_cli_score_bad_flags(tmp_path: Path, rel_ckpt: Path, flags: list[str], pattern: str, capsys) -> None:
    write_caption_tar(tmp_path / "tars" / "00000000.tar", n=2)
    out = tmp_path / "out"
    argv = ["score", "caption", "--model-path", str(rel_ckpt), "--tar-file-path", str(tmp_path / "tars"),
            "--output-dir", str(out), *flags]  # fmt: skip
    code, err = _cli(argv, capsys)
    import re

    assert code == 2 and re.search(pattern, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--keep", "0"], r"keep_fraction must be in \(0, 1\], got 0"),
        (["--keep", "1.5"], r"keep_fraction must be in \(0, 1\], got 1.5"),
        (["--keep", "-0.3"], r"keep_fraction must be in \(0, 1\]"),
        (["--keep", "nan"], r"keep_fraction must be in \(0, 1\]"),
        (["--absolute", "inf"], r"absolute threshold must be a finite number"),
    ],
)
def test_cli_thresholds_bad_values(tmp_path: Path, flags: list[str], pattern: str, capsys) -> None:
    root = tmp_path / "root"
    code, err = _cli(["thresholds", "--root", str(root), "--record", *flags], capsys)
    import re

    assert code == 2 and re.search(pattern, err), err
    assert not root.exists(), "nothing (not even a catalog) is created for a bad request"


def test_cli_thresholds_wrong_root(tmp_path: Path, capsys) -> None:
    code, err = _cli(["thresholds", "--root", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no catalog at" in err
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------------------------- Dagster


def _scores_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write_caption_tar(root / "sources/cap/00000001.tar", n=2)
    return root


def _materialize_scores(root: Path, ckpt: Path | None, **scoring):
    import dagster as dg

    from unifilter_dagster.assets.tars import scores

    resources = make_resources(root, ckpt, [("cap", "caption")], **scoring)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tars", ["cap_0001"])
        return materialize([scores], resources, instance, "cap_0001")


@pytest.mark.parametrize("case", CASES)
def test_scores_asset_bad_checkpoint(tmp_path: Path, bad_checkpoints, case: str) -> None:
    path, pattern = bad_checkpoints[case]
    root = _scores_root(tmp_path)
    before = files_under(root)
    result = _materialize_scores(root, path)
    assert not result.success
    import re

    message = failure_message(result)
    assert re.search(pattern, message), message
    assert files_under(root) == before, "no output before the configuration is known to be good"


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"batch_size": -1}, r"batch_size must be an int >= 1, got -1"),
        ({"num_workers": -1}, r"num_workers must be an int >= 0"),
        ({"device": "tpu"}, r"device"),
    ],
)
def test_scores_asset_bad_options(tmp_path: Path, rel_ckpt: Path, options: dict, pattern: str) -> None:
    import re

    root = _scores_root(tmp_path)
    before = files_under(root)
    result = _materialize_scores(root, rel_ckpt, **options)
    assert not result.success
    message = failure_message(result)
    assert re.search(pattern, message), message
    assert files_under(root) == before


def test_scores_asset_partition_without_tar(tmp_path: Path, rel_ckpt: Path) -> None:
    root = _scores_root(tmp_path)
    write_caption_tar(root / "sources/cap/00000002.tar", n=2)
    (root / "sources/cap/00000001.tar").unlink()
    result = _materialize_scores(root, rel_ckpt)
    assert not result.success
    assert "no tar numbered 1 under" in failure_message(result)
    assert not (root / "scores").exists()


def test_tar_manifest_explicit_source_path_missing(tmp_path: Path) -> None:
    import dagster as dg
    from dagster_duckdb import DuckDBResource

    from unifilter_dagster.assets.tars import tar_manifest
    from unifilter_dagster.resources import SourceConfig, UniFilterHome

    root = tmp_path / "root"
    home = UniFilterHome(
        root=str(root), use_world=False,
        sources=[SourceConfig(name="cap", kind="caption", path=str(tmp_path / "typo"))],
    )  # fmt: skip
    resources = {"home": home, "duckdb": DuckDBResource(database=str(root / "unifilter.duckdb"))}
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize([tar_manifest], resources, instance)
        assert not result.success
        assert instance.get_dynamic_partitions("tars") == []
    message = failure_message(result)
    assert "cap" in message and str(tmp_path / "typo") in message and "does not exist" in message


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"keep_fraction": 1.5}, r"keep_fraction must be in \(0, 1\], got 1.5"),
        ({"keep_fraction": 0.0}, r"keep_fraction must be in \(0, 1\], got 0.0"),
        ({"keep_fraction": -1.0}, r"keep_fraction must be in \(0, 1\]"),
    ],
)
def test_quality_threshold_bad_keep_fraction(tmp_path: Path, config: dict, pattern: str) -> None:
    import re

    import dagster as dg

    from unifilter_dagster.assets.tars import quality_threshold

    root = tmp_path / "root"
    resources = make_resources(root, None, [("cap", "caption")])
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [quality_threshold], resources=resources, instance=instance, raise_on_error=False,
            run_config={"ops": {"quality_threshold": {"config": config}}},
        )  # fmt: skip
    assert not result.success
    message = failure_message(result)
    assert re.search(pattern, message), message
    assert not (root / "thresholds.json").exists()
