"""What a big registry costs `sanitator audit`: one table (issue 36).

Two registries, each audited by the real command (private Prefect API, Dask LocalCluster,
Parquet store, MLflow on sqlite), every process of it sampled twice a second:

1. `--repos N` folders, each a tiny BERT (hard links to one build, each its own repo id:
   N real scans under a tiny budget).
2. `--listing M` folders holding only a config.json: listing entries whose row the plan
   settles without a download ("no weights"). The crawl of all M is timed on its own
   (in this process); the audit of the first `--listing-audit K` of them (default: all)
   measures what each such row costs: the Prefect record task, the MLflow run and the
   Parquet file, and the same audit with --no-mlflow splits MLflow's share out.

    OMP_NUM_THREADS=1 ./run python benchmarks/load.py --repos 1000 --listing 10000 \\
        [--listing-audit K] [--workers 2] [--work DIR]

  compute      = the rows' `seconds` summed (each model's audit on its worker: fetch,
                 preflight, scan)
  orchestration = workers x wall - compute: everything that kept a worker from scanning
                 (start-up, scheduling, Prefect's task runs, recording, the end), as a share
                 of compute; also split into the start (command start to the first
                 finished audit), the steady state per model, and the end
  flow memory  = the RSS of the flow process (the `sanitator` command) against the rows
                 written, a least-squares slope over the second half of the run

Targets (issue 36), for --repos 1000: orchestration <= 5 % of compute; flow memory flat
(growth per model well under 1 MB); the 10,000-entry listing crawled in <= 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# the budget under which the real scan takes a few seconds on a tiny encoder
# (benchmarks/audit_repeat.py)
TINY_SCAN = {"steps_per_seed": 40, "n_sentences": 96, "n_holdout": 32, "max_seeds": 4,
             "parallel_seeds": 4, "hard_token_candidates": 16}
DONE = re.compile(r" (\d+)/(\d+) models")
FLOW, API = "flow (the sanitator command)", "Prefect API"
CONFIG = '{"model_type": "bert", "architectures": ["BertModel"]}'


def build_repos(root: Path, n: int) -> Path:
    from sanitator.attacks.models import build_tiny_encoder

    base = root / "tiny-bert"
    if not (base / "model.safetensors").is_file():
        build_tiny_encoder("bert", base, seed=0)
    zoo = root / f"repos-{n}"
    for index in range(n):
        member = zoo / f"org{index // 100:03d}" / f"tiny-{index:05d}"
        if not (member / "config.json").is_file():
            shutil.copytree(base, member, copy_function=os.link)
    return zoo


def build_listing(root: Path, m: int, name: str = "listing") -> Path:
    zoo = root / f"{name}-{m}"
    for index in range(m):
        member = zoo / f"org{index // 1000:03d}" / f"entry-{index:06d}"
        if not (member / "config.json").is_file():
            member.mkdir(parents=True, exist_ok=True)
            (member / "config.json").write_text(CONFIG)
    return zoo


def role(process, root_pid: int) -> str:
    import psutil

    try:
        command = " ".join(process.cmdline())
        parent = process.ppid()
    except psutil.Error:
        return "gone"
    if process.pid == root_pid:
        return FLOW
    if "uvicorn" in command:
        return API
    if "resource_tracker" in command:
        return "resource tracker"
    if "forkserver" in command:
        return "forkserver" if parent == root_pid else "Dask worker"
    return "other: " + command[:40]


class Sampler(threading.Thread):
    """RSS and CPU time of every process under `pid`, twice a second."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.peak: dict[int, tuple[str, int]] = {}     # pid -> (role, peak RSS)
        self.cpu: dict[int, tuple[str, float]] = {}    # pid -> (role, CPU seconds)
        self.flow_rss: list[tuple[float, int]] = []    # (time, RSS) of the flow process
        self.roles: dict[int, str] = {}
        self.series: dict[int, list[tuple[float, float]]] = {}  # pid -> (time, CPU s)

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    with process.oneshot():
                        rss = process.memory_info().rss
                        times = process.cpu_times()
                except psutil.Error:
                    continue
                name = self.roles.get(process.pid) or role(process, self.pid)
                self.roles[process.pid] = name
                self.peak[process.pid] = (name, max(rss, self.peak.get(process.pid,
                                                                       (name, 0))[1]))
                self.cpu[process.pid] = (name, times.user + times.system)
                self.series.setdefault(process.pid, []).append(
                    (time.monotonic(), times.user + times.system))
                if process.pid == self.pid:
                    self.flow_rss.append((time.monotonic(), rss))
            self.stop.wait(self.interval)

    def cpu_between(self, name: str, start: float, end: float) -> float:
        """CPU seconds the processes of one role spent between two moments."""
        total = 0.0
        for pid, series in self.series.items():
            if self.roles.get(pid) != name:
                continue
            before = [cpu for at, cpu in series if at <= start]
            upto = [cpu for at, cpu in series if at <= end]
            if upto:
                total += upto[-1] - (before[-1] if before else 0.0)
        return total


SCANNER: str | None = None  # --scanner: another scan function (the orchestration alone)


def audit(zoo: Path, store: Path, workers: int, *, mlflow: bool = True) -> dict:
    """Run `sanitator audit` on `zoo`, sampled; returns what was measured."""
    command = [str(Path(sys.executable).with_name("sanitator")), "audit",
               "--registry", f"path:{zoo}", "--out", str(store), "--workers", str(workers),
               "--json"]
    if not mlflow:
        command.append("--no-mlflow")
    if SCANNER:
        command += ["--scanner", SCANNER]
    for key, value in TINY_SCAN.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid)
    sampler.start()
    progress: list[tuple[float, int]] = []   # (time, rows written) from the log lines
    errors: list[str] = []

    marks: dict[str, float] = {}

    def read_log() -> None:
        for line in process.stderr:
            found = DONE.search(line)
            if found:
                progress.append((time.monotonic(), int(found.group(1))))
            if "rejected from metadata" in line:
                marks["planned"] = time.monotonic()
            if "settled from the listing" in line:
                marks["settled"] = time.monotonic()
            if "Traceback" in line or " ERROR " in line or line.startswith("sanitator"):
                errors.append(line.strip()[:2000])  # the command's own last word too

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    out = process.stdout.read()
    process.wait()
    wall = time.monotonic() - started
    reader.join(timeout=10)
    sampler.stop.set()
    sampler.join(timeout=10)
    if process.returncode != 0:
        raise SystemExit(f"audit of {zoo} failed ({process.returncode}): {errors[-5:]}")
    return {"wall": wall, "started": started, "summary": json.loads(out),
            "progress": progress, "sampler": sampler, "errors": errors, "marks": marks}


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def rss_per_row(run: dict) -> float | None:
    """Bytes of flow-process RSS per row written, over the second half of the run."""
    progress, rss = run["progress"], run["sampler"].flow_rss
    if len(progress) < 4 or not rss:
        return None
    half = progress[len(progress) // 2][0]
    points = []
    for at, value in rss:
        if at < half:
            continue
        done = max((rows for t, rows in progress if t <= at), default=None)
        if done is not None:
            points.append((float(done), float(value)))
    return slope(points)


def per_role(sampler: Sampler, table: dict) -> dict[str, list]:
    found: dict[str, list] = {}
    for name, value in table.values():
        found.setdefault(name, []).append(value)
    return found


def idle_between(intervals: list[tuple[float, float]], workers: int, start: float,
                 end: float) -> float:
    """Worker-seconds in [start, end] not covered by an audit: W minus the audits running
    at each moment (never below zero: a row is written a moment after its audit ends)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    idle, busy, last = 0.0, 0, start
    for at, step in events:
        at = min(max(at, start), end)
        idle += max(0, workers - busy) * (at - last)
        busy, last = busy + step, at
    return idle + max(0, workers - busy) * (end - last)


def scans(zoo: Path, store: Path, workers: int) -> list[tuple[str, str]]:
    from sanitator.pipeline.store import read_verdicts

    launched = time.time()
    run = audit(zoo, store, workers)
    rows = read_verdicts(store)
    n = len(rows)
    seconds = rows["seconds"].astype(float)
    compute = float(seconds.sum())
    statuses = rows["status"].value_counts().to_dict()
    # each audit's interval on the command's clock: it ended when its row was written
    ends = [ts.timestamp() - launched for ts in rows["audited_at"]]
    intervals = [(end - took, end) for end, took in zip(ends, seconds, strict=True)]
    first, last, wall = min(a for a, _ in intervals), max(ends), run["wall"]
    middle = idle_between(intervals, workers, first, last)
    overhead = workers * wall - compute
    steady = middle / n
    projected = (workers * first + workers * (wall - last) + 1000 * steady) / (
        1000 * compute / n)
    sampler = run["sampler"]
    at = run["started"]
    peak = per_role(sampler, sampler.peak)
    growth = rss_per_row(run)
    flow_cpu = sampler.cpu_between(FLOW, at + first, at + last) / n
    api_cpu = sampler.cpu_between(API, at + first, at + last) / n
    lines = [
        ("repos audited (real scans of a tiny BERT)", f"{n} ({statuses})"),
        ("wall", f"{wall:.1f} s"),
        ("compute (sum of the rows' seconds)",
         f"{compute:.1f} s, {compute / n:.2f} s per model"),
        ("orchestration beyond the scans (workers x wall - compute)",
         f"{overhead:.1f} s = {100 * overhead / compute:.1f} % of compute"),
        ("  start (command start to the first audit's start)", f"{first:.1f} s"),
        ("  steady state: idle worker-seconds per model",
         f"{steady:.3f} s = {100 * steady / (compute / n):.1f} % of a model's audit"),
        ("  end (the last row to the command's exit)", f"{wall - last:.1f} s"),
        ("  projected for 1,000 such models (same start and end)",
         f"{100 * projected:.1f} % of compute"),
        ("flow process CPU per model, steady state (Prefect, MLflow, store, scheduler)",
         f"{flow_cpu:.3f} s"),
        ("Prefect API CPU per model, steady state", f"{api_cpu:.3f} s"),
        ("  their CPU beside the scans (on the workers' cores)",
         f"{100 * (flow_cpu + api_cpu) / (compute / n):.1f} % of a model's audit"),
        ("flow process RSS growth per model (second half)",
         f"{growth / 1024:.1f} KiB" if growth is not None else "-"),
    ]
    lines += [(f"peak RSS: {name}", ", ".join(f"{v / 2**20:.0f} MiB" for v in sorted(values)))
              for name, values in sorted(peak.items())]
    return lines


def listing(root: Path, m: int, k: int, workers: int) -> list[tuple[str, str]]:
    from sanitator.pipeline.registries import parse_registry

    zoo = build_listing(root, m)
    started = time.perf_counter()
    refs = list(parse_registry(f"path:{zoo}").crawl())
    crawl = time.perf_counter() - started
    lines = [("listing entries crawled", f"{len(refs)} in {crawl:.1f} s "
              f"({1000 * crawl / max(len(refs), 1):.2f} ms each)")]
    if not k:
        return lines
    part = zoo if k >= m else build_listing(root, k, "listing-audited")
    timings = {}
    for mlflow in (True, False):
        store = root / f"store-listing-{k}-{'mlflow' if mlflow else 'no-mlflow'}-{time.time():.0f}"
        run = audit(part, store, workers, mlflow=mlflow)
        rows = run["summary"]["audited"]
        # the rows are written one after another once the plan is made
        start, end = run["marks"].get("planned"), run["marks"].get("settled")
        span = end - start if start and end else None
        sampler = run["sampler"]
        peak = per_role(sampler, sampler.peak)
        timings[mlflow] = span / rows if span and rows else None
        label = "with MLflow" if mlflow else "--no-mlflow"
        lines += [
            (f"listing audit, {label}: rows, wall", f"{rows} rows, {run['wall']:.1f} s"),
            (f"  seconds per row settled from the listing ({label})",
             f"{timings[mlflow]:.3f} s" if timings[mlflow] else "-"),
        ]
        if span:
            for name in (FLOW, API):
                lines.append((f"  {name} CPU per row ({label})",
                              f"{sampler.cpu_between(name, start, end) / rows:.3f} s"))
        lines.append((f"  flow process peak RSS ({label})",
                      f"{max(peak.get(FLOW, [0])) / 2**20:.0f} MiB"))
    if timings[True] and timings[False]:
        lines.append(("bookkeeping per row: Prefect task + Parquet file / MLflow run",
                      f"{timings[False]:.3f} s / {timings[True] - timings[False]:.3f} s"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repos", type=int, default=1000,
                        help="folders of real tiny models (0: skip)")
    parser.add_argument("--listing", type=int, default=10000,
                        help="listing entries without weights to crawl (0: skip)")
    parser.add_argument("--listing-audit", type=int, default=None, metavar="K",
                        help="audit the first K listing entries, with and without MLflow "
                             "(default: all; 0: crawl only)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scanner", metavar="MODULE:FUNCTION",
                        help="scan with this function instead (importable by the workers, "
                             "e.g. fake_scanners:by_name with PYTHONPATH=tests/flows: what "
                             "the orchestration costs without scans)")
    parser.add_argument("--work", type=Path, help="folder for the registries and stores "
                                                   "(default: a new temporary folder)")
    args = parser.parse_args()
    global SCANNER
    SCANNER = args.scanner
    work = args.work or Path(tempfile.mkdtemp(prefix="sanitator-load-"))
    work.mkdir(parents=True, exist_ok=True)
    lines: list[tuple[str, str]] = [("machine", f"{os.cpu_count()} cores, {args.workers} "
                                     "workers"), ("work folder", str(work))]
    if args.repos:
        zoo = build_repos(work, args.repos)
        lines += scans(zoo, work / f"store-repos-{args.repos}-{time.time():.0f}", args.workers)
    if args.listing:
        k = args.listing if args.listing_audit is None else args.listing_audit
        lines += listing(work, args.listing, min(k, args.listing), args.workers)
    width = max(len(name) for name, _ in lines)
    print(f"| {'measure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|---|")
    for name, value in lines:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    main()
