"""The original repository's interleaved (OBELICS) scoring command, run by this project's engine.

``python data_scoring/data_quality_classifier_interleaved_scoring.py --model-path ... --tar-file-path ...`` takes
the original script's flags and writes what it wrote: ``<NNNNNNNN>_quality_score.parquet`` per tar, next to the
tars (``--output-dir`` elsewhere). It is ``unifilter score interleaved --output-format original``; see
docs/guide.md, "Coming from the original scripts". The batch size changes speed only, not the scores.
"""

import sys

from unifilter_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", "interleaved", "--output-format", "original", *sys.argv[1:]]))
