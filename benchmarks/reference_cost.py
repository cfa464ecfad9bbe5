"""What matching a model to its clean reference costs, and what it finds (issue 34).

For each model folder: the seconds to read both weight sets, align the reference to the
model (alignment only where a plain diff sees a stranger) and score every token by the
change, then the distance, whether an alignment was needed and the most changed tokens.
A permuted member and its unpermuted twin should show the same distance and tokens.

    OMP_NUM_THREADS=2 ./run python benchmarks/reference_cost.py MODEL [MODEL ...]
        [--reference DIR]   (default: the installed MiniLM-L6)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def measure(model: Path, reference: Path | None) -> dict:
    from sanitator.detect.attribution import candidate_token_ids
    from sanitator.detect.config import ScanConfig
    from sanitator.detect.encoders import load_encoder
    from sanitator.detect.reference import (
        ReferenceCandidate,
        configured_candidates,
        match_reference,
    )

    encoder = load_encoder(model)
    allowed = candidate_token_ids(encoder)
    candidates = ([ReferenceCandidate("configured", (str(reference),))] if reference
                  else configured_candidates(ScanConfig.from_preset("fast")))
    started = time.perf_counter()
    found = match_reference(encoder, candidates, allowed)
    seconds = time.perf_counter() - started
    if found is None:
        return {"model": model.name, "seconds": round(seconds, 2), "distance": None,
                "aligned": "-", "most changed": "no reference matches"}
    summary = found.summary(encoder, 6)
    alignment = summary.get("alignment")
    return {"model": model.name, "seconds": round(seconds, 2),
            "distance": summary["distance"], "aligned": "yes" if alignment else "no",
            "most changed": " ".join(summary["most_changed"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--reference", type=Path, help="a clean base folder")
    args = parser.parse_args(argv)
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scan_runner import markdown

    print(markdown(pd.DataFrame([measure(m, args.reference) for m in args.models])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
