"""Scoring throughput with tars and tables on a local S3 server against the same tars on local disk.

Run from the repository root (CPU, a few minutes; needs the dev extras for moto)::

    python benchmarks/storage_throughput.py                 # 4 tars x 500 captions, 256 px noise JPEGs
    python benchmarks/storage_throughput.py --tars 2 --samples 200 --repeats 1

One process: writes the tars and a random-init ``world`` checkpoint, starts moto's S3 server on 127.0.0.1 (in
this process, so its request handling shares the CPU with scoring: a pessimistic stand-in for a real store,
which serves from other machines) and uploads the tars. Then it alternates, ``--repeats`` times, a full scoring
run of every tar (``score_tars`` with ``--force``, the CLI's engine call) from the local folder into a local
folder and from ``s3://`` into ``s3://``, with the same loaded model, and prints samples/s of both (medians) and
``s3 / local`` first.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="benchmark",
        AWS_SECRET_ACCESS_KEY="benchmark",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    return server, f"http://{host}:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500, help="captions per tar")
    parser.add_argument("--side", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=1, help="decode workers (each streams the tar)")
    args = parser.parse_args()

    import fsspec

    from tests.tarfixtures import caption_members, noise_jpeg, write_tar
    from unifilter_core.modeling import init_checkpoint
    from unifilter_core.scorer import load_scorer
    from unifilter_core.scoring import discover_tars, score_tars
    from unifilter_core.scoring.settings import ScoringSettings
    from unifilter_core.tokenization import train_bpe_tokenizer

    work = Path(tempfile.mkdtemp(prefix="unifilter-storage-"))
    texts = [f"a photo of thing number {i} on a table" for i in range(args.samples)]
    for t in range(args.tars):
        members = []
        for i, text in enumerate(texts):
            members += caption_members(
                f"{t:04d}{i:05d}", image=noise_jpeg(args.side, seed=t * 100_000 + i), text=text
            )
        write_tar(work / "shards" / f"{t:08d}.tar", members)
    tokenizer = train_bpe_tokenizer(texts, work / "tok", vocab_size=512)
    ckpt = Path(init_checkpoint("world", work / "ckpt", tokenizer_dir=tokenizer, seed=0))

    server, endpoint = _start_s3()
    fs = fsspec.filesystem("s3")
    fs.mkdir("unifilter-bench")
    for tar in sorted((work / "shards").glob("*.tar")):
        fs.put_file(str(tar), f"unifilter-bench/shards/{tar.name}")

    settings = ScoringSettings(device="cpu", num_workers=args.num_workers).resolve("caption")
    scorer = load_scorer(ckpt, settings=settings)
    config = settings.scoring_config()
    places = {
        "local": (str(work / "shards"), str(work / "scores")),
        "s3": ("s3://unifilter-bench/shards", "s3://unifilter-bench/scores"),
    }
    rates: dict[str, list[float]] = {name: [] for name in places}
    try:
        for _ in range(args.repeats):
            for name, (src, out) in places.items():
                tars = discover_tars(src)
                start = time.perf_counter()
                rows = sum(
                    s.rows
                    for s in score_tars(
                        tars,
                        scorer,
                        out,
                        kind="caption",
                        source="bench",
                        config=config,
                        progress=False,
                        force=True,
                    )
                )
                rates[name].append(rows / (time.perf_counter() - start))
    finally:
        server.stop()
    size_mb = sum(p.stat().st_size for p in (work / "shards").glob("*.tar")) / 2**20
    medians = {name: statistics.median(v) for name, v in rates.items()}
    print(f"s3 / local: {medians['s3'] / medians['local']:.2f}x samples/s")
    print(
        f"tars: {args.tars} x {args.samples} captions ({size_mb:.1f} MB), {args.num_workers} decode worker(s), "
        f"world checkpoint, cpu; S3: moto server in this process at {endpoint}"
    )
    for name, values in rates.items():
        print(f"{name:>6}: median {medians[name]:.1f} samples/s  ({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
