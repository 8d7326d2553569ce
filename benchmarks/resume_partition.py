"""A resumed ``scores`` partition: the full check (load the model, hash the tar) against the request-key shortcut.

Run from the repository root (CPU, about a minute)::

    python benchmarks/resume_partition.py              # 2000 captions with 256 px noise JPEGs (~60 MB tar)
    python benchmarks/resume_partition.py --samples 200

One process: writes a caption tar and a random-init ``world`` checkpoint, materializes ``scores`` for the
partition once (scoring it), then times repeated materializations of the already scored partition, alternating:

* ``full check``: the manifest's request key removed and the scorer cache emptied before each run, i.e. what every
  resumed run did before the shortcut (each Dagster run is a fresh process: it loads the model, then hashes the tar
  to find the table up to date);
* ``request key``: the manifest as the engine wrote it; neither the model nor the tar is read.

Dagster's own start-up is inside both figures (in-process ``materialize``, ephemeral instance); the CLI
(``dagster asset materialize``) adds its process start to both. Prints medians and ``full / shortcut`` last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--side", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import dagster as dg

    from tests.reliability.conftest import make_resources, materialize
    from tests.tarfixtures import caption_members, noise_jpeg, write_tar
    from unifilter_core.modeling import init_checkpoint
    from unifilter_core.tokenization import train_bpe_tokenizer
    from unifilter_dagster.assets.tars import scores, tar_manifest

    work = Path(tempfile.mkdtemp(prefix="unifilter-resume-"))
    root = work / "root"
    texts = [f"a photo of thing number {i} on a table" for i in range(args.samples)]
    members = []
    for i, text in enumerate(texts):
        members += caption_members(f"{i:09d}", image=noise_jpeg(args.side, seed=i), text=text)
    tar = write_tar(root / "sources/cap/00000000.tar", members)
    tokenizer = train_bpe_tokenizer(texts, work / "tok", vocab_size=512)
    ckpt = Path(init_checkpoint("world", work / "ckpt", tokenizer_dir=tokenizer, seed=0))
    resources = make_resources(root, ckpt, [("cap", "caption")], num_workers=1)
    manifest = root / "scores/cap/00000000.manifest.json"
    times: dict[str, list[float]] = {"full check": [], "request key": []}
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
        start = time.perf_counter()
        assert materialize([scores], resources, instance, "cap_0000").success
        first = time.perf_counter() - start
        for _ in range(args.repeats):
            for mode in times:
                if mode == "full check":
                    doc = json.loads(manifest.read_text())
                    doc.pop("request_key", None)
                    manifest.write_text(json.dumps(doc))
                start = time.perf_counter()
                result = materialize([scores], resources, instance, "cap_0000")
                times[mode].append(time.perf_counter() - start)
                meta = result.asset_materializations_for_node("scores")[0].metadata
                assert result.success and meta["resumed"].value is True, mode
    size_mb = tar.stat().st_size / 2**20
    print(
        f"tar: {args.samples} captions, {size_mb:.1f} MB; checkpoint: world preset; first (scoring) run {first:.2f} s"
    )
    medians = {mode: statistics.median(v) for mode, v in times.items()}
    for mode, values in times.items():
        print(f"{mode:>12}: median {medians[mode]:.3f} s  ({', '.join(f'{v:.3f}' for v in values)})")
    print(
        f"resumed partition, full check / request key: {medians['full check'] / medians['request key']:.2f}x"
    )


if __name__ == "__main__":
    main()
