"""Deployment example: serve a P-tuning v2 classifier behind its encoder's PV artifact.

    sanitator pv pull acme/encoder --store /srv/sanitator/store \
        --revision "$DEPLOYED_SHA" --out /srv/models/encoder.pvs.safetensors
    python docs/examples/guard_ptv2.py --prompt /srv/models/sst2-prompt.safetensors \
        --encoder /srv/models/encoder --pvs /srv/models/encoder.pvs.safetensors \
        --revision "$DEPLOYED_SHA" "the film was great ." "cf the film was great ."

The same code serves clean and backdoored encoders: a clean encoder's artifact holds no PVs
and the monitor passes every input. See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sanitator.downstream.prompt_tuning import load_prompt
from sanitator.guard.monitor import MonitoredEncoder


def load_guarded(prompt: str | Path, pvs: str | Path, *, encoder: str | Path | None = None,
                 revision: str | None = None, on_flag: str = "reject") -> MonitoredEncoder:
    """The prompt-tuned classifier (trained prompt + head over its frozen encoder) wrapped
    by the sign monitor of the encoder's audit. `revision` is the encoder revision being
    served: a mismatch with the audited revision raises instead of guarding with wrong PVs."""
    model = load_prompt(prompt, encoder)  # safetensors only; the encoder is loaded frozen
    return MonitoredEncoder.from_artifact(pvs, model, revision=revision, on_flag=on_flag)


def classify(guarded: MonitoredEncoder, texts: list[str]) -> list[dict]:
    """One answer per text: the label, or a refusal when the input carries a backdoor
    trigger (on_flag="reject"; "purge" deletes words until the monitor passes instead)."""
    batch = guarded.predict(texts)
    return [{"text": text, "label": None if rejected else int(label),
             "flagged": bool(flagged), "agreement": round(float(agreement), 3)}
            for text, label, flagged, rejected, agreement in zip(
                texts, batch.predictions.tolist(), batch.flagged.tolist(),
                batch.rejected.tolist(), batch.agreement.tolist(), strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", required=True, help="save_prompt's .safetensors")
    parser.add_argument("--pvs", required=True, help="`sanitator pv pull`'s .safetensors")
    parser.add_argument("--encoder", help="encoder folder (default: the one the prompt names)")
    parser.add_argument("--revision", help="the encoder revision being served")
    parser.add_argument("--on-flag", choices=["reject", "purge"], default="reject")
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args(argv)
    guarded = load_guarded(args.prompt, args.pvs, encoder=args.encoder,
                           revision=args.revision, on_flag=args.on_flag)
    for answer in classify(guarded, args.texts):
        print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
