"""The data stage's near-dedup against the tools a user would pick instead, same corpus, same job.

    python -m tailorlm.bench.peers --docs 100000
    python -m tailorlm.bench.peers --docs 10000 --docs 100000      # + fixed overhead and ms/doc
    python -m tailorlm.bench.peers --docs 2000 --only tailorlm,rensa --keep

Every system removes near duplicates from the planted corpus of `tailorlm.bench.corpus` with word
5-grams, 128 permutations, 16 bands x 8 rows, threshold 0.8, on 2 CPUs, and writes what it keeps:
- tailorlm: the `tailorlm data` command end to end, filters, PII, normalization and exact dedup
  off. Its embedded Ray takes os.cpu_count() CPUs (the CLI has no setting), 2 on the box measured.
  tailorlm_defaults: the same with tailorlm's own near-dedup defaults (Jaccard 0.5 on 5-grams,
  32 x 4 bands, exact check) instead of the shared parameters.
- datatrove: MinhashDedupSignature -> Buckets -> Cluster -> Filter, LocalPipelineExecutor with 2
  workers, JSONL out. It splits work by file, so it reads the corpus as 2 shards.
- datajuicer: `ray_bts_minhash_deduplicator` under Data-Juicer's Ray executor, local Ray, 2 CPUs.
- datasketch: MinHashLSH in one process; rensa: RMinHash + RMinHashLSH (Rust) in one process.
  Both shingle as tailorlm does and check candidates against the signature estimate.

Each peer lives in its own virtualenv under ~/.cache/tailorlm-bench/venvs (made on first use;
none of them pulls torch) and runs `peer_drivers.py` there. A run is one subprocess whose wall
time and peak RSS (summed over its whole process tree, Ray's raylet and workers included,
sampled every 0.2 s) are measured while holding /tmp/tailorlm-cpu.lock, so runs on a shared
machine do not overlap. Scoring: a predicted pair is two documents of one predicted group.
Precision and recall are against the planted pairs (a pair of two unrelated documents counts
as false) and against the planted pairs whose true word-5-gram Jaccard is >= 0.8.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pandas as pd

SYSTEMS = ("tailorlm", "tailorlm_defaults", "datatrove", "datajuicer", "datasketch", "rensa")
PEERS = {  # pip requirements of each peer's own virtualenv
    "datatrove": ["datatrove[processing]==0.10.1", "spacy", "orjson"],  # spacy: its English word tokenizer
    "datajuicer": ["py-data-juicer==1.6.1", "ray[default,data]==2.60.0"],  # no extras: they pull torch
    "datasketch": ["datasketch==2.0.0"],
    "rensa": ["rensa==0.5.0"],
}
VERSIONS = {  # distributions whose installed versions the report prints
    "datatrove": ["datatrove", "spacy"],
    "datajuicer": ["py-data-juicer", "ray"],
    "datasketch": ["datasketch"],
    "rensa": ["rensa"],
}
VENVS = os.path.expanduser(os.environ.get("TAILORLM_BENCH_VENVS", "~/.cache/tailorlm-bench/venvs"))
DRIVERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_drivers.py")
LOCK = "/tmp/tailorlm-cpu.lock"
# `tailorlm data` doing only what the peers do: read, near dedup, write kept/ and dropped/, with
# the benchmark's parameters pinned (the defaults may move; verify: exact is the default now)
TAILORLM_OFF = [
    "data.dedup.near.num_perm=128",
    "data.dedup.near.bands=16",
    "data.dedup.near.rows=8",
    "data.dedup.near.threshold=0.8",
    "data.dedup.near.ngram=5",
    "data.dedup.near.cjk_ngram=5",
    "data.dedup.near.verify=exact",
    "data.normalize=false",
    "data.filters.min_chars=0",
    "data.filters.max_chars=1000000000",
    "data.filters.min_tokens=0",
    "data.filters.languages=[]",
    "data.filters.quality=false",
    "data.pii.enabled=false",
    "data.dedup.exact=false",
    "data.decontaminate=false",
    "data.eval_fraction=0",
]


def tailorlm_overrides(defaults: bool = False) -> list[str]:
    """TAILORLM_OFF, plus the token filter off: `null` where the config takes it (then the rows are
    not tokenized at all), else a bound no row reaches."""
    from pydantic import ValidationError

    from tailorlm.config import FilterConfig

    off = [o for o in TAILORLM_OFF if not (defaults and o.startswith("data.dedup.near."))]
    try:
        FilterConfig(max_tokens=None)
        return off + ["data.filters.max_tokens=null"]
    except ValidationError:
        return off + ["data.filters.max_tokens=1000000000"]


def peer_python(peer: str) -> str:
    """The peer's virtualenv, made (or redone when its requirements changed) on first use."""
    venv = os.path.join(VENVS, peer)
    python, stamp = os.path.join(venv, "bin", "python"), os.path.join(venv, ".requirements")
    want = "\n".join(PEERS[peer])
    if os.path.exists(python) and os.path.exists(stamp) and open(stamp).read() == want:
        return python
    print(f"[peers] installing {peer} into {venv}: {' '.join(PEERS[peer])}", flush=True)
    base = shutil.which("python3.11") or sys.executable
    subprocess.run([base, "-m", "venv", "--clear", venv], check=True)
    log = venv + "-install.log"
    with open(log, "w") as fh:
        if subprocess.run([python, "-m", "pip", "install", *PEERS[peer]], stdout=fh, stderr=fh).returncode:
            raise RuntimeError(f"installing {peer} failed; see {log}")
    with open(stamp, "w") as fh:
        fh.write(want)
    return python


def versions(system: str) -> dict[str, str]:
    if system.startswith("tailorlm"):
        from importlib.metadata import version

        return {"tailorlm": version("tailorlm"), "ray": version("ray")}
    code = f"import importlib.metadata as m, json; print(json.dumps({{d: m.version(d) for d in {VERSIONS[system]!r}}}))"
    return json.loads(subprocess.run([peer_python(system), "-c", code], capture_output=True, text=True).stdout)


def tree_rss(pid: int) -> tuple[int, int]:
    """(summed PSS of a process and all its descendants, the same over the process itself and
    its Ray workers only). Ray's daemons and workers are the driver's descendants; walking the
    tree rather than matching "ray::" in every command line leaves out other users' Ray on a
    shared machine. The second figure leaves out Ray's daemons (GCS, raylet, dashboard), as
    bench/dedup.py counts. PSS, not RSS: shared pages (the object store, which every reader of
    a block maps) are split among the processes that map them instead of counted by each."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = workers = 0
    for p in procs:
        try:
            rss = p.memory_full_info().pss
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += rss
        if p.pid == pid or "ray::" in cmd or "default_worker.py" in cmd:
            workers += rss
    return total, workers


def measure(cmd: list[str], log: str, timeout: float) -> dict:
    """Run cmd under the CPU lock; wall time up to its `@@done` line (or its exit), peak tree RSS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray, never a shared one
    with open(LOCK, "a") as lock, open(log, "w") as out:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        peak, peak_workers, timed_out = 0, 0, False
        while proc.poll() is None:
            total, workers = tree_rss(proc.pid)
            peak, peak_workers = max(peak, total), max(peak_workers, workers)
            if time.time() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, 9)  # the session it started: its own Ray included
            time.sleep(0.2)
        end = time.time()
        try:
            os.killpg(proc.pid, 9)  # anything it left behind (Ray daemons of a crashed driver)
        except ProcessLookupError:
            pass
    done = [float(line.split()[1]) for line in open(log, errors="replace") if line.startswith("@@done ")]
    wall = (done[-1] if done else end) - t0
    return {"wall_s": wall, "peak_gib": peak / 2**30, "workers_gib": peak_workers / 2**30, "rc": proc.returncode,
            "timed_out": timed_out}  # fmt: skip


def run_system(system: str, corpus: str, shards: str, out: str, timeout: float) -> tuple[dict, pd.DataFrame]:
    """Measure one system; returns the measurement and its predicted groups (id, group)."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    log = out + ".log"
    if system.startswith("tailorlm"):
        overrides = tailorlm_overrides(defaults=system == "tailorlm_defaults")
        cmd = [sys.executable, "-m", "tailorlm.cli", "data", "--input", corpus, "--output", out, *overrides]
    else:
        cmd = [peer_python(system), DRIVERS, system, shards if system == "datatrove" else corpus, out]
    m = measure(cmd, log, timeout)
    if m["rc"] != 0 or m["timed_out"]:
        tail = open(log, errors="replace").read().strip().splitlines()[-1:] or ["(no output)"]
        m["error"] = f"timed out after {timeout:.0f} s" if m["timed_out"] else f"rc {m['rc']}: {tail[0][:200]}"
        return m, pd.DataFrame(columns=["id", "group"])
    if system.startswith("tailorlm"):
        dropped = pd.concat(
            [
                pd.read_parquet(f, columns=["id", "reason", "duplicate_of"])
                for f in glob.glob(f"{out}/dropped/*.parquet")
            ]
        )
        near = dropped[dropped["reason"] == "near_duplicate"]
        groups = pd.concat(
            [
                pd.DataFrame({"id": near["id"], "group": near["duplicate_of"]}),
                pd.DataFrame({"id": near["duplicate_of"].unique(), "group": near["duplicate_of"].unique()}),
            ]
        )
        m["timings_s"] = json.load(open(f"{out}/stats.json"))["timings_s"]
        return m, groups
    return m, pd.read_json(os.path.join(out, "groups.jsonl"), lines=True, dtype={"id": str})


def score(groups: pd.DataFrame, planted: pd.DataFrame) -> dict:
    pred = set()
    for _, members in groups.groupby("group")["id"]:
        pred.update(tuple(sorted(p)) for p in itertools.combinations(sorted(set(members)), 2))
    plant = {tuple(sorted(p)) for p in zip(planted["a"], planted["b"])}
    true = {tuple(sorted(p)) for p, j in zip(zip(planted["a"], planted["b"]), planted["jaccard"]) if j >= 0.8}

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "pairs": len(pred),
        "P_planted": ratio(len(pred & plant), len(pred)),
        "R_planted": ratio(len(pred & plant), len(plant)),
        "P_j08": ratio(len(pred & true), len(pred)),
        "R_j08": ratio(len(pred & true), len(true)),
    }


def make_corpus(n: int, root: str) -> tuple[str, str, pd.DataFrame]:
    """corpus.jsonl, the same lines as 2 shards (datatrove parallelizes over files), planted pairs."""
    from tailorlm.bench.corpus import planted_corpus, write_corpus

    docs, planted = planted_corpus(n)
    corpus, _ = write_corpus(docs, planted, os.path.join(root, f"corpus-{n}"))
    shards = os.path.join(root, f"corpus-{n}", "shards")
    os.makedirs(shards, exist_ok=True)
    lines = open(corpus, encoding="utf-8").readlines()
    half = (len(lines) + 1) // 2
    for i, part in enumerate((lines[:half], lines[half:])):
        with open(os.path.join(shards, f"part{i}.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(part)
    return corpus, shards, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, action="append", help="corpus size; give several for overhead and slope")
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--overhead-docs", type=int, default=100, help="near-empty corpus for the fixed overhead")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one system may run on one size")
    ap.add_argument("--keep", action="store_true", help="keep corpora and outputs (the folder is printed)")
    args = ap.parse_args()
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
    sizes = sorted(set(args.docs or [100_000]))
    if len(sizes) > 1:
        sizes = sorted(set(sizes) | {args.overhead_docs})
    root = tempfile.mkdtemp(prefix="tailorlm-peers-")
    print("versions:", "; ".join(f"{s} " + ", ".join(f"{k} {v}" for k, v in versions(s).items()) for s in systems))
    if os.cpu_count() != 2:
        print(f"note: tailorlm's embedded Ray takes all {os.cpu_count()} CPUs here; the peers get 2")
    rows = []
    for n in sizes:
        corpus, shards, planted = make_corpus(n, root)
        for system in systems:
            m, groups = run_system(system, corpus, shards, os.path.join(root, f"out-{n}", system), args.timeout)
            rows.append({"system": system, "docs": n, **m, **score(groups, planted)})
            r = rows[-1]
            print(f"[peers] {system} {n} docs: {r['wall_s']:.1f} s, {r['peak_gib']:.2f} GiB {r.get('error', '')}")
            if "timings_s" in m:
                print(f"[peers] tailorlm stats.json timings_s: {m['timings_s']}")
    report(pd.DataFrame(rows), sizes)
    if args.keep:
        print(f"outputs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def report(df: pd.DataFrame, sizes: list[int]) -> None:
    df = df.copy()
    if "error" in df:  # a failed run predicted nothing: no scores rather than recall 0
        df.loc[df["error"].notna(), ["P_planted", "R_planted", "P_j08", "R_j08"]] = float("nan")
    df["docs/s"] = (df["docs"] / df["wall_s"]).round(0)
    ours = df[df["system"] == "tailorlm"].set_index("docs")["wall_s"]
    df["x tailorlm"] = [w / ours[n] if n in ours else float("nan") for w, n in zip(df["wall_s"], df["docs"])]
    cols = [
        "system",
        "docs",
        "wall_s",
        "docs/s",
        "peak_gib",
        "workers_gib",
        "pairs",
        "P_planted",
        "R_planted",
        "P_j08",
        "R_j08",
    ]
    cols += ["x tailorlm"] + (["error"] if "error" in df else [])
    print(
        "\n== near-dedup, 2 CPUs, word 5-grams, 128 perms, 16 bands x 8 rows, threshold 0.8 "
        "(tailorlm_defaults: 32 x 4 bands, threshold 0.5)"
    )
    print(df[cols].round(3).to_string(index=False))
    if len(sizes) > 2:
        big, bigger = sizes[-2], sizes[-1]
        print(f"\n== fixed overhead ({sizes[0]} docs) and per-document cost (slope {big} -> {bigger} docs)")
        for system, g in df.groupby("system", sort=False):
            w = g.set_index("docs")["wall_s"]
            slope = (w[bigger] - w[big]) / (bigger - big) * 1000
            print(f"{system:<12} overhead {w[sizes[0]]:7.1f} s   {slope:7.3f} ms/doc")


if __name__ == "__main__":
    main()
