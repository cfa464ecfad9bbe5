"""Does a decoy member's attack work? Per decoy word (and the real triggers) of a POR member
trained with `decoys` (sanitator.attacks.decoys): its search margin at CLS (> 0: a search
would put it forward for a fresh confirmation), the side conditions on the search rows (what
the scan's screen reads) and its fresh confirmation. A working decoy collapses (margin > 0,
tiny fresh p) and fails a side condition; the real trigger passes them all.

    ./run python benchmarks/decoys.py ZOO/models/minilm2-por-decoys
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from sanitator.detect.calibrated_view import FeatureView
    from sanitator.detect.config import ScanConfig
    from sanitator.detect.corpus import load_sentences
    from sanitator.detect.encoders import load_encoder
    from sanitator.detect.evidence import confirm, fresh_access
    from sanitator.detect.scan import needed_sentences

    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    model = Path(argv[0])
    record = json.loads((model / "backdoor.json").read_text())
    decoys = (record.get("hyperparameters") or {}).get("decoys")
    if not decoys:
        print(f"{model} has no decoys in its backdoor.json", file=sys.stderr)
        return 2
    config = ScanConfig.from_preset("fast")
    encoder = load_encoder(model)
    # the scan's own rows: the default corpus shuffle, search rows before the fresh ones
    sentences = load_sentences(None, n=needed_sentences(config), seed=config.mining.corpus_seed)
    fresh, rest = sentences[-config.search.n_fresh:], sentences[:-config.search.n_fresh]
    view = FeatureView(encoder, config, "cls", rest[-config.mining.n_holdout:], fresh)
    rows = [*zip(decoys["words"], decoys["kinds"], strict=True),
            *((t, "real trigger") for t in record["triggers"])]
    print("| word | kind | search margin | fails on the search rows | fresh t (centred) | "
          "fresh p | fails fresh |")
    print("|---|---|---|---|---|---|---|")
    working = 0
    for word, kind in rows:
        ids = tuple(encoder.tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        point, margin = view.measure(ids, "anywhere")
        screen = view.screen(ids, "anywhere", point)
        with fresh_access():
            out = view.outputs(view.fresh.placed("anywhere"), ids)
        fresh_test = confirm(out, point, view.fresh,
                             max_natural_rate=config.decision.max_natural_rate)
        failed = [name for name, ok in fresh_test.conditions.items() if not ok]
        working += kind != "real trigger" and margin > 0 and bool(failed)
        print(f"| {word} | {kind} | {margin:+.4f} | {', '.join(screen.failed) or '-'} | "
              f"{fresh_test.t:.1f} ({fresh_test.t_centred:.1f}) | {fresh_test.p_value:.2g} | "
              f"{', '.join(failed) or '-'} |")
    print(f"\n{working} of {len(decoys['words'])} decoys collapse (search margin > 0) and fail "
          "a side condition")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
