"""Drivers for the near-dedup peers that `tailorlm.bench.peers` compares against.

Each peer runs in its own virtualenv, so this file imports nothing from tailorlm and only the
standard library at the top; it is run by path:

    <venv>/bin/python peer_drivers.py SYSTEM CORPUS OUT_DIR

CORPUS is the benchmark's corpus.jsonl (for datatrove, a folder of shards). Every driver writes
the documents it keeps to OUT_DIR (in its own format) and OUT_DIR/groups.jsonl: one line
{"id", "group"} per document that belongs to a predicted duplicate group of two or more, which
is all the scoring needs. When the dedup itself is finished it prints `@@done <unix time>`, so
that time spent only to recover groups for scoring is not counted against the peer.

Parameters are the benchmark's: word 5-grams, 128 permutations, 16 bands x 8 rows, threshold 0.8.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

NGRAM, NUM_PERM, BANDS, ROWS, THRESHOLD, CPUS = 5, 128, 16, 8, 0.8, 2
WORD = re.compile(r"\w+", re.UNICODE)
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def done() -> None:
    print(f"@@done {time.time():.3f}", flush=True)


def read_corpus(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def shingles(text: str) -> set[str]:
    """tailorlm's shingling (lowercase \\w+ words; characters for CJK-heavy text), so that the
    single-process peers differ from tailorlm in hashing and LSH, not in what they hash."""
    chars = len(text) - text.count(" ")
    if chars and len(CJK.findall(text)) > 0.3 * chars:
        toks = [c for c in text if c.isalnum()]
    else:
        toks = WORD.findall(text.lower())
    return {" ".join(toks[i : i + NGRAM]) for i in range(max(1, len(toks) - NGRAM + 1))}


def union_find_groups(n: int, edges) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smallest index (first in the file) is kept
    return [find(i) for i in range(n)]


def write_groups_and_kept(docs: list[dict], roots: list[int], out: str) -> None:
    sizes: dict[int, int] = {}
    for r in roots:
        sizes[r] = sizes.get(r, 0) + 1
    write_jsonl(os.path.join(out, "kept.jsonl"), (d for i, d in enumerate(docs) if roots[i] == i))
    write_jsonl(
        os.path.join(out, "groups.jsonl"),
        ({"id": d["id"], "group": roots[i]} for i, d in enumerate(docs) if sizes[roots[i]] > 1),
    )


# ----------------------------------------------------------------------------- single process
def run_datasketch(corpus: str, out: str) -> None:
    from datasketch import MinHash, MinHashLSH

    docs = read_corpus(corpus)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=(BANDS, ROWS))
    sigs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in shingles(d["text"])])
        lsh.insert(i, m)
        sigs.append(m)
    # candidates from the bands, kept when the signature estimate clears the threshold
    edges = [(i, j) for i, m in enumerate(sigs) for j in lsh.query(m) if j > i and m.jaccard(sigs[j]) >= THRESHOLD]
    write_groups_and_kept(docs, union_find_groups(len(docs), edges), out)
    done()


def run_rensa(corpus: str, out: str) -> None:
    from rensa import RMinHash, RMinHashLSH

    docs = read_corpus(corpus)
    mhs = RMinHash.from_token_sets([shingles(d["text"]) for d in docs], NUM_PERM, 1)  # hashed in Rust
    lsh = RMinHashLSH(THRESHOLD, NUM_PERM, BANDS)  # 128 / 16 bands = 8 rows
    lsh.insert_many(mhs)
    cands = lsh.query_all(mhs)
    edges = [(i, j) for i, js in enumerate(cands) for j in js if j > i and mhs[i].jaccard(mhs[j]) >= THRESHOLD]
    write_groups_and_kept(docs, union_find_groups(len(docs), edges), out)
    done()


# ----------------------------------------------------------------------------- datatrove
def run_datatrove(shards: str, out: str) -> None:
    """The four-stage MinHash pipeline of datatrove's own example, 2 workers. Cluster ids are
    saved (a small extra file per task) so that removed and kept documents name their group."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS)
    tasks = len(os.listdir(shards))  # datatrove splits work by file: one shard per task
    work, logs = os.path.join(out, "work"), os.path.join(out, "logs")

    def reader():
        return JsonlReader(shards, id_key="id", text_key="text")

    def executor(pipeline, n_tasks, name):
        return LocalPipelineExecutor(
            pipeline=pipeline, tasks=n_tasks, workers=CPUS, logging_dir=f"{logs}/{name}", skip_completed=False
        )

    executor([reader(), MinhashDedupSignature(f"{work}/sigs", config=cfg)], tasks, "sigs").run()
    executor([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)], BANDS, "buckets").run()
    executor([MinhashDedupCluster(f"{work}/buckets", f"{work}/ids", config=cfg, save_cluster_id=True)], 1, "ids").run()
    dedup_filter = MinhashDedupFilter(
        f"{work}/ids", exclusion_writer=JsonlWriter(f"{out}/removed", compression=None), load_cluster_ids=True
    )
    executor([reader(), dedup_filter, JsonlWriter(f"{out}/kept", compression=None)], tasks, "filter").run()
    done()
    rows = []
    for sub in ("kept", "removed"):  # a writer that got no document writes no file
        for name in sorted(os.listdir(os.path.join(out, sub))) if os.path.isdir(os.path.join(out, sub)) else []:
            for d in read_corpus(os.path.join(out, sub, name)):
                group = d.get("metadata", {}).get("minhash_cluster_id", -1)
                if group >= 0:
                    rows.append({"id": d["id"], "group": group})
    write_jsonl(os.path.join(out, "groups.jsonl"), rows)


# ----------------------------------------------------------------------------- Data-Juicer
def run_datajuicer(corpus: str, out: str) -> None:
    """`dj-process` with the Ray executor and ray_bts_minhash_deduplicator, on a local Ray with 2
    CPUs. The op keeps one document per group and forgets the groups (its union-find actors keep
    only the set of duplicates), so for scoring an actor subclass records each duplicate's root
    before that, and the per-document uids it assigns are read back from its temporary Parquet."""
    import ray
    from data_juicer.config import init_configs
    from data_juicer.core.executor import ray_executor
    from data_juicer.core.executor.ray_executor import RayExecutor
    from data_juicer.ops.deduplicator import ray_bts_minhash_deduplicator as bts

    class GroupsUnionFind(bts.BTSUnionFind):
        def squeeze(self):
            mine = [x for x in self.parent if x // bts.BATCH_SIZE % self.parallel_num == self.parallel_id]
            self.groups = {x: self.find(x) for x in mine}
            super().squeeze()

        def get_groups(self):
            return self.groups

    bts.BTSUnionFind = GroupsUnionFind  # get_remote_classes looks the class up at call time
    ops = []
    run_op = bts.RayBTSMinhashDeduplicator.run

    def keep_op(self, dataset, **kw):
        ops.append(self)
        return run_op(self, dataset, **kw)

    bts.RayBTSMinhashDeduplicator.run = keep_op
    ray_executor.TempDirManager.__exit__ = lambda self, *exc: None  # keep the uid Parquet for scoring

    op = {
        "tokenization": "space",
        "window_size": NGRAM,
        "lowercase": True,
        "num_permutations": NUM_PERM,
        "num_bands": BANDS,
        "num_rows_per_band": ROWS,
        "jaccard_threshold": THRESHOLD,
    }
    cfg_path = os.path.join(out, "dj.yaml")
    with open(cfg_path, "w") as fh:
        json.dump(
            {
                "project_name": "peers",
                "executor_type": "ray",
                "ray_address": "local",
                "dataset_path": corpus,
                "export_path": os.path.join(out, "kept", "kept.jsonl"),
                "work_dir": os.path.join(out, "work"),
                "np": CPUS,
                "process": [{"ray_bts_minhash_deduplicator": op}],
            },
            fh,
        )  # JSON is YAML
    ray.init(address="local", num_cpus=CPUS)  # DJ's own ray.init then reuses this one
    RayExecutor(init_configs(args=["--config", cfg_path])).run()
    done()
    groups = {}
    for uf in ops[0].union_find_list:
        groups.update(ray.get(uf.get_groups.remote()))
    import pyarrow.dataset as pads

    # DJ puts its work_dir's .tmp under a timestamped folder of its own
    tmp = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(out, "work")) if "/.tmp/" in r + "/" for f in fs]
    table = pads.dataset([p for p in tmp if p.endswith(".parquet")], format="parquet").to_table(
        columns=["id", bts.HashKeys.uid]
    )
    uid_to_id = dict(zip(table.column(bts.HashKeys.uid).to_pylist(), table.column("id").to_pylist()))
    rows = [{"id": uid_to_id[u], "group": root} for u, root in groups.items()]
    rows += [{"id": uid_to_id[root], "group": root} for root in set(groups.values())]
    write_jsonl(os.path.join(out, "groups.jsonl"), rows)
    ray.shutdown()


if __name__ == "__main__":
    system, corpus_path, out_dir = sys.argv[1:4]
    os.makedirs(out_dir, exist_ok=True)
    {
        "datasketch": run_datasketch,
        "rensa": run_rensa,
        "datatrove": run_datatrove,
        "datajuicer": run_datajuicer,
    }[system](corpus_path, out_dir)
