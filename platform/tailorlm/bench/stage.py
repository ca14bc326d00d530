"""The whole data stage as users run it, at scale: wall time, time per step, peak memory.

    python -m tailorlm.bench.stage --docs 100 --docs 100000          # fixed overhead + per-doc cost
    python -m tailorlm.bench.stage --docs 1000000                    # ~1.2 GB of text
    python -m tailorlm.bench.stage --docs 100000 --near-only         # near dedup only (the peers' work)

Each size runs `tailorlm data --input corpus.jsonl --output out` as a fresh subprocess, so the
time includes starting Ray (its own embedded Ray on every CPU; none for an input under
data.in_process_max_mb, which runs in the driver: add `data.in_process_max_mb=0` to time Ray Data
on it), reading, every step and writing kept/ and dropped/. Peak memory is the summed PSS of the
driver and its Ray (GCS, raylet, workers: all in its process tree), sampled every 0.2 s, and the
driver's own peak RSS. Per-step times come from the stage's own stats.json.

The corpus is real English: sentences of the C4 sample in shared/data (or --seed-text), remixed
into distinct documents of 6-14 sentences (~1.2 KB each, like web text), with 5% exact copies and
10% edited copies (bench/corpus.py's edit kinds), so every filter and both dedup steps do real work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from tailorlm.bench.corpus import EDITS_EN, edit
from tailorlm.bench.dedup import PeakRSS

SEED_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "data", "c4_demo.jsonl")
NEAR_ONLY = [
    "data.normalize=false",
    "data.filters.quality=false",
    "data.filters.languages=[]",
    "data.filters.min_tokens=0",
    "data.filters.max_tokens=null",
    "data.filters.min_chars=0",
    "data.pii.enabled=false",
    "data.dedup.exact=false",
    "data.decontaminate=false",
]


def sentences(path: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line).get("text", "")
            out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
    return out


def write_corpus(path: str, n: int, seed_text: str, seed: int = 0) -> int:
    """n documents as JSONL; returns the bytes of text written."""
    rng = np.random.default_rng(seed)
    pool = np.array(sentences(seed_text), dtype=object)
    total = 0
    with open(path, "w", encoding="utf-8") as fh:
        prev: list[str] = []
        for i in range(n):
            r = rng.random()
            if prev and r < 0.05:
                text = prev[int(rng.integers(len(prev)))]  # an exact copy of a recent document
            elif prev and r < 0.15:
                text = edit(prev[int(rng.integers(len(prev)))], EDITS_EN[int(rng.integers(len(EDITS_EN)))], rng)
            else:
                text = " ".join(pool[rng.integers(0, len(pool), int(rng.integers(6, 15)))])
            prev = (prev + [text])[-1000:]
            total += len(text)
            fh.write(json.dumps({"id": f"d{i:08d}", "text": text}, ensure_ascii=False) + "\n")
    return total


class TreeRSS(PeakRSS):
    """bench.dedup's sampler over a process tree instead: an embedded Ray's GCS and raylet are
    children of the driver and its workers children of the raylet, so the tree is all of it (and
    not the Ray of another process on the same machine). It sums PSS, not RSS: every worker that
    reads a block maps the object store's shared pages, and summed RSS counted them once per
    reader (43 GiB "peak" on a 24 GiB machine at 1M documents). `driver_peak` is the driver's own
    RSS, what must not grow with the corpus."""

    def __init__(self, root_pid: int) -> None:
        super().__init__()
        self.root, self.driver_peak = root_pid, 0

    def _total(self) -> int:
        try:
            root = self.psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
            self.driver_peak = max(self.driver_peak, root.memory_info().rss)
        except self.psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total


def run_stage(corpus: str, out: str, overrides: list[str]) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tailorlm.cli", "data", "--input", corpus, "--output", out, *overrides]
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeRSS(proc.pid) as mem:
        log, _ = proc.communicate()
    wall = time.time() - t
    if proc.returncode:
        raise SystemExit(f"tailorlm data failed ({proc.returncode}):\n{log[-4000:]}")
    with open(os.path.join(out, "stats.json")) as fh:
        stats = json.load(fh)
    return {"wall_s": wall, "peak_gib": mem.peak / 2**30, "driver_gib": mem.driver_peak / 2**30, "stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, action="append", help="corpus size; give several for the slope")
    ap.add_argument("--near-only", action="store_true", help="switch off every step but near dedup")
    ap.add_argument("--seed-text", default=os.path.normpath(SEED_TEXT), help="JSONL of real text to remix")
    ap.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temp folder)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for tailorlm data")
    args = ap.parse_args()
    sizes = sorted(args.docs or [100, 100_000])
    overrides = (NEAR_ONLY if args.near_only else []) + args.overrides
    work = args.workdir or tempfile.mkdtemp(prefix="tailorlm-bench-stage-")
    os.makedirs(work, exist_ok=True)
    results = []
    for n in sizes:
        corpus = os.path.join(work, f"corpus-{n}.jsonl")
        if not os.path.exists(corpus):
            write_corpus(corpus, n, args.seed_text)
        mb = os.path.getsize(corpus) / 1e6
        r = run_stage(corpus, os.path.join(work, f"out-{n}"), overrides)
        s = r["stats"]
        results.append((n, r["wall_s"]))
        print(
            f"{n:>9} docs {mb:8.1f} MB  wall {r['wall_s']:7.1f} s  {n / r['wall_s']:8.0f} docs/s  "
            f"peak PSS {r['peak_gib']:5.2f} GiB (driver RSS {r['driver_gib']:4.2f})  kept {s['kept']}  "
            f"dropped {s['dropped']}  {s.get('executor', '')}"
        )
        print(f"          steps (s): {s['timings_s']}")
    if len(results) >= 2:
        (n0, t0), (n1, t1) = results[0], results[-1]
        slope = (t1 - t0) / (n1 - n0)
        print(f"fixed overhead (wall at {n0} docs): {t0:.1f} s; per-document cost: {slope * 1e3:.3f} ms/doc")


if __name__ == "__main__":
    main()
