"""Scoring throughput: our streaming engine against a faithful re-implementation of the original scoring loop.

Run from the repository root (CPU; about 2-4 minutes on 2 cores)::

    python benchmarks/score_throughput.py                 # full run, figures saved under benchmarks/results/
    python benchmarks/score_throughput.py --quick         # small smoke run
    python benchmarks/score_throughput.py --load 1        # with one busy CPU-bound process beside every run

What it does, in one process:
1. generates a caption tar (DataComp layout) and an interleaved tar (OBELICS layout) with random JPEG images of
   varied size and text of varied length, a BPE tokenizer trained on the texts, and a random-init checkpoint of the
   ``world`` preset (SigLIP-like 64 px tower, Qwen2-like 128 x 3 LLM: model compute is not negligible);
2. scores both tars with the ORIGINAL loop (``data_scoring/data_quality_classifier_*_scoring.py`` of
   Victorwz/UniFilter, re-implemented on our model: fixed-size batches in tar order (4 captions / 1 document),
   decoding and per-sample preprocessing + collate in ONE DataLoader worker, every batch padded to its longest
   sample, the model called on the padded batch; broken samples dropped), fp32 on CPU, same weights; once as
   written (torch's default intra-op threads in the model process, next to the decode worker) and once with the
   model threads tuned to the cores the worker leaves free (a fairer baseline on a small CPU machine);
3. scores them with our engine (``unifilter_core.scoring.score_tars``: worker-parallel decode overlapped with the
   model, length-bucketed batches, streaming parquet output) and checks both give the same scores;
4. measures peak RSS (ru_maxrss) of our engine in subprocesses on the caption tar and on one 10x larger.

The last two lines are the headline, the fair ratio first: ``<kind>: ours / original with tuned threads = R``
(against the original loop with its model threads set to the cores its worker leaves free), with the ratio
against the original as written beside it; the figures go to ``benchmarks/results/score_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from throughput_data import write_caption_tar, write_document_tar  # noqa: E402  (benchmarks/ is on sys.path)
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from unifilter_core.data import ReaderLimits, decode_caption, decode_document, iter_raw_samples  # noqa: E402
from unifilter_core.processing import PreparedSample  # noqa: E402
from unifilter_core.records import SampleFailure  # noqa: E402


def build_model(work: Path, corpus: list[str]) -> Path:
    from unifilter_core.modeling import init_checkpoint
    from unifilter_core.tokenization import train_bpe_tokenizer

    tok = train_bpe_tokenizer(corpus, work / "tokenizer", vocab_size=1024)
    return Path(init_checkpoint("world", work / "checkpoint", tokenizer_dir=tok, seed=0))


# ------------------------------------------------------------------------------------------------ original loop
class _OriginalTarDataset(IterableDataset):
    """wds pipeline of the original: tar -> samples -> decode (failures dropped) -> fixed-size batches."""

    def __init__(self, tar: Path, kind: str, batch_size: int) -> None:
        self.tar, self.kind, self.batch_size = tar, kind, batch_size
        self.limits = ReaderLimits()

    def __iter__(self) -> Any:
        batch: list[Any] = []
        for raw in iter_raw_samples(self.tar, limits=self.limits):
            if self.kind == "caption":
                sample = decode_caption(raw, self.limits)
            else:
                sample = decode_document(raw, self.limits)
            if isinstance(sample, SampleFailure):
                continue  # wds.warn_and_continue: the original writes no row
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


class _OriginalCollate:
    """Per-sample preprocessing, then pad every batch to its longest sample (the original's collator)."""

    def __init__(self, processor: Any, kind: str) -> None:
        self.processor, self.kind = processor, kind
        self.pad_id = int(processor.tokenizer.pad_token_id)

    def __call__(self, batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]:
        prepared: list[PreparedSample] = []
        keys = []
        for sample in batch:
            if self.kind == "caption":
                item = self.processor.prepare_caption(sample.image, sample.text)
            else:
                item = self.processor.prepare_document(sample.texts, sample.images)
            if isinstance(item, SampleFailure):
                continue  # the original skipped these documents without a row
            prepared.append(item)
            keys.append(sample.key)
        longest = max((len(p.input_ids) for p in prepared), default=1)
        ids = torch.full((len(prepared), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prepared), longest), dtype=torch.long)
        for row, p in enumerate(prepared):
            ids[row, : len(p.input_ids)] = torch.tensor(p.input_ids)
            mask[row, : len(p.input_ids)] = 1
        pixels = [p.pixel_values for p in prepared if p.pixel_values is not None]
        return ids, mask, torch.cat(pixels) if pixels else None, keys


def run_original(tar: Path, kind: str, scorer: Any, batch_size: int) -> dict[str, Any]:
    """The original scoring loop on our model; returns samples/s, model share and the scores by key."""
    loader = DataLoader(
        _OriginalTarDataset(tar, kind, batch_size),
        batch_size=None,
        num_workers=1,
        collate_fn=_OriginalCollate(scorer.processor, kind),
    )
    model = scorer.model
    scores: dict[str, float] = {}
    model_s = 0.0
    start = time.perf_counter()
    for ids, mask, pixels, keys in loader:
        if not keys:
            continue
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            out = model.scores_from_logits(logits.float()).tolist()
        model_s += time.perf_counter() - t0
        scores.update(zip(keys, out, strict=True))
    wall = time.perf_counter() - start
    return {
        "samples": len(scores),
        "wall_s": wall,
        "model_s": model_s,
        "samples_per_s": len(scores) / wall,
        "scores": scores,
    }


# ------------------------------------------------------------------------------------------------ our engine
def run_ours(tar: Path, kind: str, scorer: Any, out_dir: Path, config: Any) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from unifilter_core.scoring import score_tars

    start = time.perf_counter()
    summary = next(
        iter(
            score_tars(
                [tar], scorer, out_dir, kind=kind, source="bench", config=config, progress=False, force=True
            )
        )
    )
    wall = time.perf_counter() - start
    table = pq.read_table(summary.table_path, columns=["key", "score", "status"]).to_pylist()
    scores = {r["key"]: r["score"] for r in table if r["status"] == "ok"}
    return {
        "samples": summary.rows,
        "wall_s": wall,
        "model_s": summary.model_s,
        "samples_per_s": summary.rows / wall,
        "scores": scores,
    }


def engine_config(args: argparse.Namespace, kind: str) -> Any:
    """The engine's settings for ``kind`` on this CPU: its defaults, or the flags given."""
    from unifilter_core.scoring.settings import ScoringSettings

    batch = args.caption_batch if kind == "caption" else args.document_batch
    settings = ScoringSettings(
        device="cpu", batch_size=batch, num_workers=args.workers, max_batch_tokens=args.max_batch_tokens
    ).resolve(kind)
    return settings.scoring_config()


def rss_child(argv: list[str]) -> None:
    """Subprocess entry: score one tar with the engine and print peak RSS (KiB) of this process and its workers."""
    kind, tar, ckpt, out_dir, workers, batch = argv
    from unifilter_core.scorer import load_scorer
    from unifilter_core.scoring import ScoringConfig, score_tar
    from unifilter_core.scoring.table import table_paths

    scorer = load_scorer(ckpt)
    # spawned workers: their RSS is their own (a forked worker's RSS also counts the parent's pages it touches)
    config = ScoringConfig(batch_size=int(batch), num_workers=int(workers), start_method="spawn")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = score_tar(
        tar,
        scorer,
        table_paths(out_dir, tar)[0],
        kind=kind,
        source="bench",
        config=config,
        progress=False,
        force=True,
    )
    print(
        json.dumps(
            {
                "rows": summary.rows,
                "samples_per_s": summary.samples_per_s,
                "rss_after_load_kib": baseline,
                "peak_rss_main_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "peak_rss_worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            }
        )
    )


def measure_rss(kind: str, tar: Path, ckpt: Path, out_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = engine_config(args, kind)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-child",
        kind,
        str(tar),
        str(ckpt),
        str(out_dir),
        str(config.num_workers),
        str(config.batch_size),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def _run_original_threads(
    tar: Path, kind: str, scorer: Any, batch: int, threads: int | None
) -> dict[str, Any]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run_original(tar, kind, scorer, batch)
    finally:
        torch.set_num_threads(previous)


def compare(kind: str, tar: Path, scorer: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Original loop as written (torch's default threads next to its decode worker), the original loop with
    its model threads tuned to the cores its worker leaves free, and our engine, on the same tar."""
    from unifilter_core.cpus import available_cpus

    original_batch = 4 if kind == "caption" else 1  # the original README's batch sizes
    runs = {
        "original": _run_original_threads(tar, kind, scorer, original_batch, None),
        "original_tuned": _run_original_threads(
            tar, kind, scorer, original_batch, max(1, available_cpus() - 1)
        ),
        "ours": run_ours(tar, kind, scorer, work / f"scores_{kind}", engine_config(args, kind)),
    }
    orig, ours = runs["original"], runs["ours"]
    common = sorted(set(orig["scores"]) & set(ours["scores"]))
    diff = max((abs(orig["scores"][k] - ours["scores"][k]) for k in common), default=float("nan"))
    result: dict[str, Any] = {
        "samples": ours["samples"],
        "speedup": ours["samples_per_s"] / orig["samples_per_s"],
        "speedup_vs_tuned_original": ours["samples_per_s"] / runs["original_tuned"]["samples_per_s"],
        "max_abs_score_diff": diff,
        "compared_scores": len(common),
    }
    for name, r in runs.items():
        outside = 1 - r["model_s"] / r["wall_s"]
        result[name] = {k: round(v, 3) for k, v in r.items() if k != "scores"}
        result[name]["outside_model_share"] = round(outside, 3)
        print(
            f"{kind:11s} {name:14s}: {r['samples_per_s']:7.1f} samples/s  ({r['samples']} samples, "
            f"{r['wall_s']:.1f} s, {100 * outside:.0f}% of wall time outside the model forward)"
        )
    print(f"{kind:11s} scores agree on {len(common)} samples: max |diff| = {diff:.2e}")
    print(
        f"{kind:11s} ours / original with tuned threads = {result['speedup_vs_tuned_original']:.2f} "
        f"(ours / original as written = {result['speedup']:.2f})"
    )
    return result


def start_load(n: int) -> list[subprocess.Popen]:
    """``n`` CPU-bound processes (a Python busy loop each) that run beside the measured scoring runs."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1500)
    parser.add_argument("--documents", type=int, default=600)
    parser.add_argument(
        "--rss-base", type=int, default=400, help="captions in the small tar of the RSS check"
    )
    parser.add_argument("--rss-factor", type=int, default=10, help="the large tar holds this many times more")
    parser.add_argument(
        "--workers", type=int, default=None, help="our engine's decode workers (default: its own)"
    )
    parser.add_argument("--caption-batch", type=int, default=None, help="default: the engine's (16)")
    parser.add_argument("--document-batch", type=int, default=None, help="default: the engine's on CPU (2)")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument(
        "--load", type=int, default=0, help="busy CPU-bound processes running beside the measured runs"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--workdir", default=None, help="keep generated data here (default: a temp folder)")
    parser.add_argument(
        "--results",
        default=None,
        help="figures file (default: benchmarks/results/score_throughput[_loadN].json)",
    )
    args = parser.parse_args()
    if args.results is None:
        suffix = f"_load{args.load}" if args.load else ""
        args.results = str(REPO / "benchmarks" / "results" / f"score_throughput{suffix}.json")
    if args.quick:
        args.captions, args.documents, args.rss_base, args.rss_factor = 200, 24, 100, 3
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        corpus = write_caption_tar(work / "00000000.tar", args.captions, seed=0)
        corpus += write_document_tar(work / "00000001.tar", args.documents, seed=1)
        ckpt = build_model(work, corpus)
        print(
            f"generated data and model in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}; "
            f"{args.load} busy process(es) beside the scoring runs"
        )

        from unifilter_core.scorer import load_scorer

        scorer = load_scorer(ckpt)
        figures: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "device": "cpu",
                "dtype": "float32",
            },
            "settings": {k: v for k, v in vars(args).items() if k not in ("results", "workdir")},
            "busy_processes_beside": args.load,
        }
        load = start_load(args.load)
        try:
            figures["documents"] = compare("interleaved", work / "00000001.tar", scorer, args, work)
            figures["captions"] = compare("caption", work / "00000000.tar", scorer, args, work)
        finally:
            stop_load(load)

        small, big = work / "00000002.tar", work / "00000003.tar"
        write_caption_tar(small, args.rss_base, seed=2)
        write_caption_tar(big, args.rss_base, seed=2, repeat=args.rss_factor)
        small_rss = measure_rss("caption", small, ckpt, work / "rss", args)
        big_rss = measure_rss("caption", big, ckpt, work / "rss", args)
        figures["memory"] = {"tar_1x": small_rss, f"tar_{args.rss_factor}x": big_rss}
        for name, r in (
            (f"1x ({small_rss['rows']} samples)", small_rss),
            (f"{args.rss_factor}x ({big_rss['rows']} samples)", big_rss),
        ):
            print(
                f"peak RSS, caption tar {name}: main {r['peak_rss_main_kib'] / 1024:.0f} MiB "
                f"(after model load {r['rss_after_load_kib'] / 1024:.0f} MiB), "
                f"worker {r['peak_rss_worker_kib'] / 1024:.0f} MiB"
            )

    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures saved to {out}")
    for name in ("documents", "captions"):
        fig = figures[name]
        print(
            f"{name}{' (loaded)' if args.load else ''}: ours / original with tuned threads = {fig['speedup_vs_tuned_original']:.2f} "
            f"(ours / original as written = {fig['speedup']:.2f}; scores agree to {fig['max_abs_score_diff']:.1e})"
        )


if __name__ == "__main__":
    main()
