"""A zoo audited as a nightly run would see it: served by our Hub mirror with its bases,
audited by the real `sanitator audit --registry hf:ORG`, one table per variant (issue 34).

Lays out a Hub root from a zoo built by `sanitator zoo build` (members under
OUT/models/NAME, truth in OUT/manifest.parquet): each member as ORG/NAME (its model files
and its model card), each base under the id the members declare (`base_model` in the
card's front matter, or config.json's `_name_or_path`); serves it with
`sanitator.pipeline.registries.hubserver`, runs the CLI with default options and prints
per member: its class, verdict, score, planted PVs matched by the PVs the audit stored,
evidence.reference (source, id, revision, distance), seconds; then totals (false alarms,
missed backdoors, references right) and the recall by class.

    OMP_NUM_THREADS=1 ./run python benchmarks/hub_audit.py ZOO [--variant all]
        [--declare as-built|card|config|none] [--org zoo] [--workers 2] [--work DIR]
        [--only NAME ...] [--set KEY=VALUE ...]

Variants:
  default       members declare their base as built (or as --declare says); bases served
  no-reference  the same registry, `--no-reference` (recall without any base)
  siblings      members declare nothing, no base served, the installed base off
                (`--set references=[]`): only siblings can serve as references

A reference is right when: default, the member declares a base: the scan used that
declared base at the revision the mirror serves (a member declaring nothing: any source,
not judged; `no (tried)`: the base was handed to the scan, which did not take it, e.g.
a member identical to its base; `handed`: the verdict came before the reference stage,
and the registry had handed the declared base at the served revision, counted apart);
no-reference: none used; siblings: a sibling or the siblings' median, never the member
itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_runner import member_class, recovered

VARIANTS = ("default", "no-reference", "siblings")


def sanitator_command() -> list[str]:
    script = Path(sys.executable).with_name("sanitator")
    return [str(script)] if script.is_file() else [
        sys.executable, "-c", "from sanitator.cli import console; console()"]


def _link_model(source: Path, target: Path, *, card: bool) -> None:
    """The files an audit reads (and README.md when `card`), hard-linked where possible:
    never the zoo's ground truth (member.json, backdoor.json)."""
    from sanitator.safety.model_policy import is_scan_file

    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and (is_scan_file(path.name) or (card and path.name == "README.md")):
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)


def declared_id(folder: Path) -> str | None:
    """The base a model folder declares: its card first, then config's `_name_or_path`."""
    from sanitator.pipeline.registries.cards import card_bases, card_front_matter, declared_bases

    card = folder / "README.md"
    ids = card_bases(card_front_matter(card.read_bytes())) if card.is_file() else []
    config = json.loads((folder / "config.json").read_text())
    declared = declared_bases(ids, config)
    return declared[0].id if declared else None


def _declare(folder: Path, how: str, base_id: str) -> None:
    """Rewrite a laid-out member's declaration (`card`, `config`, `none`)."""
    card, config_path = folder / "README.md", folder / "config.json"
    card.unlink(missing_ok=True)
    config = json.loads(config_path.read_text())
    config.pop("_name_or_path", None)
    if how == "card":
        card.write_text(f"---\nbase_model: {base_id}\nlicense: apache-2.0\n---\n"
                        f"# {folder.name}\n\nA fine-tune of {base_id}.\n")
    if how == "config":
        config["_name_or_path"] = base_id
    config_path.unlink()                       # a hard link: never write through it
    config_path.write_text(json.dumps(config, indent=2))


def lay_out(zoo: Path, root: Path, org: str, variant: str, declare: str,
            only: list[str] | None = None) -> dict[str, Any]:
    """The Hub root of one variant (`only` these members, when given); returns per member
    its truth and declared base id."""
    from sanitator.attacks.zoo import read_manifest
    from sanitator.attacks.zoo.bases import materialize_base
    from sanitator.attacks.zoo.spec import BASES_DIR

    manifest = read_manifest(zoo)
    if root.exists():
        shutil.rmtree(root)
    members, bases = {}, {}
    for row in manifest.to_dict("records"):
        if only and row["name"] not in only:
            continue
        folder = root / org / row["name"]
        _link_model(zoo / "models" / row["name"], folder, card=True)
        default_id = f"{org}/{row['base']}"
        how = "none" if variant == "siblings" else declare
        if how != "as-built":
            _declare(folder, how, default_id)
        base_id = declared_id(folder)
        backdoored = bool(row["backdoored"])
        record_file = zoo / "models" / row["name"] / "backdoor.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        members[row["name"]] = {"backdoored": backdoored,
                                "attack": str(row["attack"]) if backdoored else "clean",
                                "class": member_class(SimpleNamespace(**row), record),
                                "planted": record.get("pvs") or [],
                                "declared": base_id}
        if variant != "siblings":
            bases.setdefault(base_id or default_id, row["base_ref"])
    for base_id, base_ref in bases.items():
        if base_id.split("@")[0] in {f"{org}/{m}" for m in members}:
            continue                           # a member declared as another's base
        _link_model(materialize_base(base_ref, zoo / BASES_DIR), root / base_id.split("@")[0],
                    card=False)
    return members


def pv_recall(pvs, repo: str, planted: list) -> str:
    """'found/planted': planted PVs matched (sign agreement >= 0.9) by a PV the audit
    stored for the model (`pvs`: the store's latest PV rows, read once; in the model's own
    coordinates); '-' if none planted."""
    if not planted:
        return "-"
    found = pvs[pvs["repo_id"] == repo]["vector"] if len(pvs) else []
    return f"{recovered([list(v) for v in found], planted)}/{len(planted)}"


def audit(root: Path, org: str, store: Path, variant: str, args) -> float:
    from sanitator.pipeline.registries.hubserver import HubServer

    command = [*sanitator_command(), "audit", "--registry", f"hf:{org}", "--out", str(store),
               "--workers", str(args.workers), "--json"]
    if variant == "no-reference":
        command.append("--no-reference")
    if variant == "siblings":
        command += ["--set", "references=[]"]
    for option in args.options:
        command += ["--set", option]
    with HubServer(root) as hub:
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                env={**os.environ, "HF_ENDPOINT": hub.url, "TQDM_DISABLE": "1"})
        wall = time.perf_counter() - started
    if result.returncode not in (0, 3):
        raise SystemExit(f"audit failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall


def judge(reference: dict | None, member: str, truth: dict, variant: str,
          served: dict[str, str], org: str) -> str:
    """'yes', 'no' or '-' (nothing to judge) for the reference the audit used."""
    source = (reference or {}).get("source")
    if variant == "no-reference":
        return "yes" if source is None else "no"
    if variant == "siblings":
        ids = (reference or {}).get("id") or []
        ids = [ids] if isinstance(ids, str) else ids
        return "yes" if source in {"sibling", "siblings"} and f"{org}/{member}" not in ids \
            else "no"
    if not truth["declared"]:
        return "-"
    wanted = truth["declared"].split("@")[0]
    if source == "declared" and reference.get("id") == wanted \
            and reference.get("revision") == served.get(wanted):
        return "yes"
    if source is None:  # the verdict came before the reference stage: what was handed
        handed = ((reference or {}).get("resolution") or {}).get("candidates") or []
        first = handed[0] if handed else {}
        if first.get("source") == "declared" and first.get("id") == wanted \
                and first.get("revision") == served.get(wanted):
            return "handed"
    # handed to the scan, which found the model not derived from it (or identical to it)
    tried = any(t.get("source") == "declared" and t.get("id") == wanted
                for t in (reference or {}).get("tried") or ())
    return "no (tried)" if tried else "no"


def table(zoo: Path, work: Path, variant: str, args) -> dict[str, Any]:
    from sanitator.cli.verdicts import reference_summary
    from sanitator.pipeline.registries.hubserver.repos import RepoIndex
    from sanitator.pipeline.store import latest_verdicts, read_pvs

    root, store = work / f"hub-{variant}", work / f"store-{variant}-{int(time.time())}"
    members = lay_out(zoo, root, args.org, variant, args.declare, args.only)
    index = RepoIndex(root)
    served = {repo: index.get(repo).sha for repo in index.repo_ids()}
    wall = audit(root, args.org, store, variant, args)
    verdicts = latest_verdicts(store).set_index("repo_id")
    pvs = read_pvs(store, latest=True)
    rows, totals = [], {"false_alarms": 0, "missed": 0, "right": 0, "judged": 0, "handed": 0}
    for repo, verdict in verdicts.iterrows():
        name = repo.split("/", 1)[1] if repo.startswith(f"{args.org}/") else None
        truth = members.get(name) if name else None
        reference = reference_summary(verdict["evidence"]) or {}
        right = judge(reference, name, truth, variant, served, args.org) if truth else "-"
        status = verdict["status"]
        if truth:
            totals["false_alarms"] += status == "backdoored" and not truth["backdoored"]
            totals["missed"] += truth["backdoored"] and status != "backdoored"
            totals["judged"] += right not in ("-", "handed")
            totals["right"] += right == "yes"
            totals["handed"] += right == "handed"
        ids = reference.get("id")
        rows.append({"model": repo, "truth": (truth or {}).get("attack", "base"),
                     "class": (truth or {}).get("class", "base"),
                     "status": status, "score": verdict["score"],
                     "pvs": pv_recall(pvs, repo, truth["planted"]) if truth else "-",
                     "ref_source": reference.get("source", "-"),
                     "ref_id": ",".join(ids) if isinstance(ids, list) else ids or "-",
                     "ref_revision": _short(reference.get("revision")),
                     "distance": reference.get("distance"), "right": right,
                     "seconds": verdict["seconds"]})
    return {"variant": variant, "wall_s": round(wall, 1), "rows": rows, **totals}


def _short(revision: Any) -> str:
    if isinstance(revision, list):
        return ",".join(str(r)[:8] for r in revision)
    return str(revision)[:12] if revision else "-"


def print_table(result: dict[str, Any]) -> None:
    columns = ("model", "class", "status", "score", "pvs", "ref_source", "ref_id",
               "ref_revision", "distance", "right", "seconds")

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if value == value else "-"
        return "-" if value is None else str(value)

    cells = [[cell(row[c]) for c in columns] for row in result["rows"]]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n== {result['variant']} (wall {result['wall_s']} s)")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"false alarms {result['false_alarms']}, missed backdoors {result['missed']}, "
          f"references right {result['right']} of {result['judged']}"
          + (f"; {result['handed']} more found before the reference stage, the declared base"
             " at the served revision handed to them" if result.get("handed") else ""))
    print("recall by class: " + "; ".join(
        f"{name} {found}/{total}" for name, (found, total) in recall_by_class(result).items()))


def recall_by_class(result: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Per backdoored class: (members found backdoored, members)."""
    classes: dict[str, list[int]] = {}
    for row in result["rows"]:
        if row["truth"] in ("clean", "base"):
            continue
        counts = classes.setdefault(row["class"], [0, 0])
        counts[0] += row["status"] == "backdoored"
        counts[1] += 1
    return {name: (found, total) for name, (found, total) in sorted(classes.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zoo", type=Path, help="a zoo folder built by `sanitator zoo build`")
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--declare", choices=["as-built", "card", "config", "none"],
                        default="as-built",
                        help="how members declare their base (default: as the zoo built "
                             "them)")
    parser.add_argument("--org", default="zoo", help="the Hub org the members are served in")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="serve only these members (their bases too)")
    parser.add_argument("--set", dest="options", action="append", default=[],
                        metavar="KEY=VALUE", help="a scan option for every variant")
    parser.add_argument("--work", type=Path, help="where hub roots and stores go")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="sanitator-hub-audit-"))
    results = []
    for variant in VARIANTS if args.variant == "all" else (args.variant,):
        result = table(args.zoo.resolve(), work.resolve(), variant, args)
        print_table(result)
        results.append(result)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
