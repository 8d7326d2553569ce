"""Drift per tar and calibration: PSI/KS on crafted histograms, calibration figures on crafted predictions, and a
tar whose captions are all replaced by web spam flagged by a classifier trained to tell them apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.tarfixtures import caption_members, jpeg_bytes, write_tar
from unifilter_core.calibration import calibration_report
from unifilter_core.catalog import Catalog
from unifilter_core.catalog.stats import fine_histogram
from unifilter_core.drift import DriftLimits, dense, drift_row, ks, psi
from unifilter_core.reference import write_reference

GOOD = ["a", "small", "blue", "sphere", "on", "the", "table", "in", "garden", "green", "cone", "kitchen"]
SPAM = ["BUY", "CHEAP", "PILLS", "CLICK", "HERE", "www", "casino", "WIN", "$$$", "FREE", "bonus", "NOW"]


def _hist(scores: list[float]) -> np.ndarray:
    return dense(*fine_histogram(np.asarray(scores)))


def test_psi_and_ks_on_crafted_histograms() -> None:
    rng = np.random.default_rng(0)
    ref = _hist(list(rng.uniform(0, 3, 4000)))
    same = _hist(list(rng.uniform(0, 3, 4000)))
    low = _hist(list(rng.uniform(0, 0.6, 4000)))
    assert psi(same, ref) < 0.02 and ks(same, ref)[0] < 0.05 and ks(same, ref)[1] > 0.01
    assert psi(low, ref) > 2.0
    d, p = ks(low, ref)
    assert d == pytest.approx(0.8, abs=0.02) and p < 1e-12
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12) and ks(ref, ref) == (0.0, 1.0)


def test_drift_row_flags_shifts_and_failed_tars_only() -> None:
    rng = np.random.default_rng(1)
    ref = ("validation:caption", _hist(list(rng.uniform(0, 3, 500))))
    limits = DriftLimits()

    def stats(scores: list[float], errors: int = 0) -> dict:
        bins, counts = fine_histogram(np.asarray(scores))
        return {"source": "s", "n_rows": len(scores) + errors, "n_error": errors, "n_skipped": 0,
                "fine_bins": bins, "fine_counts": counts}  # fmt: skip

    fine = drift_row("s_0000", stats(list(rng.uniform(0, 3, 200))), ref, limits)
    assert not fine.flagged and fine.reason is None and fine.n == 200 and fine.n_reference == 500
    shifted = drift_row("s_0001", stats(list(rng.uniform(0, 0.5, 200))), ref, limits)
    assert shifted.flagged and shifted.reason == "score_shift" and shifted.psi > 1
    small = drift_row("s_0002", stats(list(rng.uniform(0, 0.5, 3))), ref, limits)
    assert not small.flagged  # three scores: a gap that sampling explains (KS not significant)
    broken = drift_row("s_0003", stats(list(rng.uniform(0, 3, 10)), errors=30), ref, limits)
    assert broken.flagged and broken.reason == "error_share" and broken.error_share == 0.75
    none = drift_row("s_0004", stats([1.0, 2.0]), None, limits)
    assert not none.flagged and none.reason == "no_reference" and none.reference == "none"
    with pytest.raises(ValueError, match="psi limit"):
        DriftLimits(psi=0)


def test_calibration_figures_on_crafted_predictions() -> None:
    levels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    scores = np.array([0.0, 0.4, 1.0, 1.6, 2.0, 2.0, 3.0, 2.4])  # rounds to 0 0 1 2 2 2 3 2
    report = calibration_report(scores, levels, bins=3)  # bins [0, 1), [1, 2), [2, 3]
    by_level = {r["level"]: r for r in report["per_level"]}
    assert by_level[0]["mean_score"] == pytest.approx(0.2) and by_level[0]["predicted_share"] == 1.0
    assert by_level[1]["mean_score"] == pytest.approx(1.3) and by_level[1]["predicted_share"] == 0.5
    assert by_level[3]["mean_score"] == pytest.approx(2.7) and by_level[3]["predicted_share"] == 0.5
    assert report["accuracy"] == pytest.approx(6 / 8)
    # bin [0, 1): scores 0, 0.4 (levels 0, 0): gap 0.2; [1, 2): 1.0, 1.6 (1, 1): gap 0.3;
    # [2, 3]: 2.0, 2.0, 3.0, 2.4 (2, 2, 3, 3): mean score 2.35 vs level 2.5, gap 0.15
    assert report["ece"] == pytest.approx(2 / 8 * 0.2 + 2 / 8 * 0.3 + 4 / 8 * 0.15)
    assert [b["n"] for b in report["reliability"]] == [2, 2, 4]
    perfect = calibration_report(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0, 1, 2, 3]), bins=3)
    assert perfect["ece"] == pytest.approx(0.0) and perfect["accuracy"] == 1.0
    with pytest.raises(ValueError, match="one length"):
        calibration_report(np.zeros(3), np.zeros(2, dtype=int))


def _caption(rng: np.random.Generator, words: list[str]) -> str:
    return " ".join(rng.choice(words, size=int(rng.integers(4, 8))))


@pytest.fixture(scope="module")
def spam_classifier(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[Path, Path]:
    """A tiny classifier trained (briefly, on CPU) to score good captions 3 and web spam 0, and its data root
    with caption validation pairs (half good, half spam) and their reference."""
    from PIL import Image

    from unifilter_core.scorer import checkpoint_fingerprint
    from unifilter_core.training import load_config, train_stage2

    root = tmp_path_factory.mktemp("spam_root")
    data = root / "synthetic" / "caption"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 30 * i, dtype=np.uint8)).save(data / f"{i}.png")
    pairs = [{"image": f"{i % 8}.png", "text": "<image>\n" + _caption(rng, SPAM if i % 2 else GOOD),
              "label": 0 if i % 2 else 3} for i in range(160)]  # fmt: skip
    (data / "train.json").write_text(json.dumps(pairs[:96]))
    (data / "val.json").write_text(json.dumps(pairs[96:]))
    values = {
        "model_path": str(tiny_checkpoint), "output_dir": str(root / "ckpt"), "data_path": str(data / "train.json"),
        "eval_data_path": str(data / "val.json"), "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32,
        "learning_rate": 1e-2, "max_steps": 120, "warmup_ratio": 0.0, "logging_steps": 10, "freeze_vision_tower": False,
    }  # fmt: skip
    ckpt = Path(train_stage2(load_config(None, "stage2", values)))
    doc = write_reference(root, ckpt, checkpoint_fingerprint(ckpt))
    assert doc["kinds"]["caption"]["n"] == 64
    return root, ckpt


def test_a_tar_of_web_spam_is_flagged_and_an_unchanged_tar_is_not(spam_classifier: tuple[Path, Path]) -> None:
    from unifilter_core.partition_groups import PartitionTars, score_partition_tars
    from unifilter_core.partition_steps import TarSource
    from unifilter_core.scorer import load_scorer

    root, ckpt = spam_classifier
    calibration = json.loads(next((root / "models" / "reference").glob("*.json")).read_text())
    assert (
        calibration["kinds"]["caption"]["calibration"]["accuracy"] >= 0.9
    )  # the classifier tells them apart
    rng = np.random.default_rng(7)
    texts = [_caption(rng, SPAM if i % 2 else GOOD) for i in range(80)]
    shards = root / "sources" / "web"
    for number, spam in ((0, False), (1, True)):
        members = []
        for i, text in enumerate(texts):
            text = _caption(rng, SPAM) if spam else text  # every caption replaced by web spam
            members += caption_members(f"{i:09d}", image=jpeg_bytes(color=(30 * (i % 8),) * 3), text=text)
        write_tar(shards / f"{number:08d}.tar", members)
    catalog = Catalog(root=root)
    spec = TarSource("web", "caption")
    scorer = load_scorer(ckpt, device="cpu", batch_size=16)
    part = PartitionTars(
        spec, "web_0000", [("web_0000", shards / "00000000.tar"), ("web_0001", shards / "00000001.tar")]
    )
    results = score_partition_tars(root, part, request_keys={"web_0000": "a", "web_0001": "b"}, load=lambda: scorer,
                                   catalog=catalog, drift=DriftLimits())  # fmt: skip
    by_key = {r.tar_key: r.drift for r in results}
    assert not by_key["web_0000"].flagged, by_key["web_0000"]
    assert by_key["web_0001"].flagged and by_key["web_0001"].reason == "score_shift", by_key["web_0001"]
    assert by_key["web_0001"].reference == "validation:caption"
    _, rows = catalog.query("SELECT partition_key, flagged, reason FROM score_drift ORDER BY 1")
    assert rows == [("web_0000", False, None), ("web_0001", True, "score_shift")]
    # the same with the unchanged tar named as the reference
    again = score_partition_tars(root, part, request_keys={"web_0000": "a", "web_0001": "b"}, load=lambda: scorer,
                                 catalog=catalog, drift=DriftLimits(), drift_reference=["web_0000"])  # fmt: skip
    assert [r.drift.flagged for r in again] == [False, True]
    assert again[1].drift.reference == "tars:web_0000"
    # the workbench shows the flag and the classifier's calibration
    from unifilter_core.report import build_workbench

    page, _, _ = build_workbench(catalog)
    flagged = page.split('data-testid="drift-flagged"', 1)[1].split("</table>", 1)[0]
    assert "<td>web_0001</td>" in flagged and "<td>web_0000</td>" not in flagged and "score_shift" in flagged
    calibration = page.split('data-testid="calibration-caption"', 1)[1].split("</table>", 1)[0]
    assert calibration.count("<tr>") == 5  # the header and levels 0..3


def test_the_canary_set_passes_with_its_scorer_and_catches_another(
    spam_classifier: tuple[Path, Path], tiny_checkpoint: Path
) -> None:
    from unifilter_core.canary import check_canary
    from unifilter_core.partition_groups import PartitionTars, score_partition_tars
    from unifilter_core.partition_steps import TarSource
    from unifilter_core.reference import read_reference, run_canary
    from unifilter_core.scorer import load_scorer

    root, ckpt = spam_classifier
    scorer = load_scorer(ckpt, device="cpu", batch_size=4)
    canary = read_reference(root, scorer.model_fingerprint)["kinds"]["caption"]["canary"]
    assert sorted(c["level"] for c in canary) == [0, 0, 3, 3]
    assert all(c["score"] < 1 for c in canary if c["level"] == 0) and all(
        c["score"] > 2 for c in canary if c["level"] == 3
    )
    same = run_canary(root, scorer, "caption")
    assert same["passed"] and same["n"] == 4 and same["max_abs_diff"] < 1e-4
    other = check_canary(load_scorer(tiny_checkpoint, device="cpu"), "caption", canary)  # another model
    assert not other["passed"] and other["max_abs_diff"] > 0.5
    assert (
        run_canary(root, load_scorer(tiny_checkpoint, device="cpu"), "caption") is None
    )  # no reference: not run

    write_tar(root / "sources" / "canary" / "00000000.tar",
              caption_members("000000000", image=jpeg_bytes(color=(9, 9, 9)), text="a small blue sphere"))  # fmt: skip
    part = PartitionTars(TarSource("canary", "caption"), "canary_0000",
                         [("canary_0000", root / "sources" / "canary" / "00000000.tar")])  # fmt: skip
    score_partition_tars(
        root, part, request_keys={"canary_0000": "k"}, load=lambda: scorer, canary_tolerance=0.05
    )
    manifest = json.loads((root / "scores" / "canary" / "00000000.manifest.json").read_text())
    assert manifest["canary"]["passed"] and manifest["canary"]["reference"] == scorer.model_fingerprint
