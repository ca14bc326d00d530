"""Training throughput: our Ray Train + DeepSpeed loop against a plain torchrun DDP loop.

    python -m tailorlm.bench.train --steps 40            # ZeRO-2 full finetune vs DDP, 2 workers each, 3 rounds
    python -m tailorlm.bench.train --variants            # also ZeRO-3 and LoRA: tokens/s and peak RSS
    python -m tailorlm.bench.train --zero0               # also ZeRO-0: where the gap to DDP comes from

Same tiny model, data (fixed-length packed sequences, so tokens/s is well defined), micro batch,
seed and precision (fp32: DDP has no bf16 master weights to compare with). Throughput is the
median of per-step tokens/s after 5 warm-up steps, so start-up (Ray, DeepSpeed init) is excluded
from both; DDP and ours alternate for --rounds rounds, each round starting with a different one,
and the medians are compared, because this VM's speed drifts between runs. Prints the ratio and
both final training losses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SEQ, MICRO, WARMUP = 128, 8, 5


def write_data_stage(root: Path, n_rows: int = 1024) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tailorlm.demo_data import document, planets

    facts = planets(40)
    texts = [" ".join(document(facts[(i + j) % 40]) for j in range(3)) for i in range(n_rows)]
    d = root / "bench" / "data"
    (d / "kept").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": [f"r{i}" for i in range(n_rows)],
                "split": ["train"] * (n_rows - 16) + ["eval"] * 16,
                "text": texts,
                "messages": [None] * n_rows,
            }
        ),
        d / "kept" / "part.parquet",
    )
    (d / "_COMPLETE.json").write_text("{}")


def ours(root: Path, steps: int, extra: list[str]) -> dict:
    from tailorlm.config import load_config
    from tailorlm.pipeline import run_stage

    cfg = load_config(
        None,
        [
            f"run.storage={root}",
            "run.name=bench",
            "train.method=full",
            "train.precision=fp32",
            f"train.max_seq_len={SEQ}",
            "train.packing=true",
            f"train.micro_batch_size={MICRO}",
            f"train.max_steps={steps}",
            f"train.eval_every={steps}",
            "train.warmup_steps=0",
            "train.lr=1e-3",
            "train.scheduler=constant",
            "train.grad_clip=0",
            "train.lora.dropout=0",
            *extra,
        ],
    )
    run_stage(cfg, "train", force=True, echo=lambda s: None)
    hist = [json.loads(line) for line in (root / "bench" / "train" / "metrics.jsonl").read_text().splitlines()]
    steps_h = [h for h in hist if "train_loss" in h]
    return {
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steps_h[WARMUP:]),
        "final_loss": steps_h[-1]["train_loss"],
        "peak_rss_mib": steps_h[-1]["peak_rss_mib"],
    }


DDP_SCRIPT = r"""
import json, os, resource, statistics, sys, time
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import pyarrow.parquet as pq
from tailorlm.models import load_model, load_tokenizer
from tailorlm.train.formats import encode_text, pack, collate
model_path, data_path, steps, seq, micro, out = sys.argv[1:7]
steps, seq, micro = int(steps), int(seq), int(micro)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
torch.manual_seed(0)
tok = load_tokenizer(model_path)
rows = [r for r in pq.read_table(data_path).to_pylist() if r["split"] == "train"]
seqs = pack([encode_text(tok, r["text"], seq) for r in rows], seq)
mine = seqs[rank::world]
model = DDP(load_model(model_path, dtype="float32"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
rates, loss = [], None
for step in range(steps):
    t = time.time()  # like ours, a step includes building its batch
    b = mine[(step * micro) % len(mine):][:micro]
    batch = collate({"input_ids": [x[0] for x in b], "labels": [x[1] for x in b]}, tok.pad_token_id)
    loss = model(**batch).loss
    loss.backward()
    opt.step(); opt.zero_grad()
    n = torch.tensor([(batch["labels"] != -100).sum().item()], dtype=torch.float64)
    dist.all_reduce(n)
    rates.append(n.item() / (time.time() - t))
if rank == 0:
    json.dump({"tokens_per_s": statistics.median(rates[5:]), "final_loss": loss.item(),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, open(out, "w"))
dist.destroy_process_group()
"""


def ddp(root: Path, model_path: str, steps: int) -> dict:
    script = root / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = root / "ddp.json"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            model_path,
            str(root / "bench" / "data" / "kept" / "part.parquet"),
            str(steps),
            str(SEQ),
            str(MICRO),
            str(out),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    return json.loads(out.read_text())


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating DDP / ours rounds; medians are reported "
        "(one run of each moved the DDP figure 19k-26k tokens/s between runs on this VM)",
    )
    ap.add_argument("--variants", action="store_true", help="also ZeRO-3 and LoRA (one run each)")
    ap.add_argument(
        "--zero0",
        action="store_true",
        help="also ZeRO stage 0 (no partitioning) in every round: "
        "splits the gap to DDP into Ray Train + DeepSpeed engine cost and ZeRO-2's partitioning cost",
    )
    args = ap.parse_args()
    import ray

    from tailorlm.bench import rotated
    from tailorlm.cluster import LOCAL_SYSTEM_CONFIG
    from tailorlm.config import load_config
    from tailorlm.models import resolve_base

    ray.init(
        address="local", num_cpus=2, include_dashboard=True, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    model_path = resolve_base(load_config(None).model)
    runs: dict[str, list[dict]] = {"ddp": [], "zero2": [], "zero0": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data_stage(root)
        contenders = {
            "ddp": lambda: ddp(root, model_path, args.steps),
            "zero2": lambda: ours(root, args.steps, ["train.deepspeed.stage=2"]),
            "zero0": lambda: ours(root, args.steps, ["train.deepspeed.stage=0"]),
        }
        order = [k for k in contenders if k != "zero0" or args.zero0]
        for r in range(args.rounds):
            # rotate who goes first: with a fixed order (DDP, ZeRO-2, ZeRO-0) ZeRO-2 measured 0.86x
            # DDP over three rounds, yet ZeRO-2 run after ZeRO-0 beat it twice, and per-step timing
            # put ZeRO-2's own cost at ~4% (a 3-4 ms longer optimizer step); position, not code
            for name in rotated(order, r):
                runs[name].append(contenders[name]())
            print(
                f"round {r + 1}: "
                + "  ".join(f"{k} {v[-1]['tokens_per_s']:.0f}" for k, v in runs.items() if v)
                + " tokens/s",
                flush=True,
            )
        base, mine = runs["ddp"], runs["zero2"]
        print(
            f"\n== training throughput: tiny Llama, {SEQ}-token packed sequences, micro batch {MICRO} x 2 "
            f"workers, fp32, {args.steps} steps (per run: median tokens/s after {WARMUP} warm-up steps; "
            f"below: medians over {args.rounds} alternating rounds)"
        )
        print(
            f"torchrun DDP (gloo):            {_median(base, 'tokens_per_s'):8.0f} tokens/s  final loss "
            f"{base[-1]['final_loss']:.3f}  peak RSS/worker {_median(base, 'peak_rss_mib'):6.0f} MiB"
        )
        print(
            f"Ray Train + DeepSpeed ZeRO-2:   {_median(mine, 'tokens_per_s'):8.0f} tokens/s  final loss "
            f"{mine[-1]['final_loss']:.3f}  peak RSS/worker {_median(mine, 'peak_rss_mib'):6.0f} MiB"
        )
        print(f"ratio ours / DDP: {_median(mine, 'tokens_per_s') / _median(base, 'tokens_per_s'):.2f}")
        if args.zero0:
            z0 = runs["zero0"]
            print(
                f"Ray Train + DeepSpeed ZeRO-0:   {_median(z0, 'tokens_per_s'):8.0f} tokens/s  final loss "
                f"{z0[-1]['final_loss']:.3f}  ratio ours / DDP: "
                f"{_median(z0, 'tokens_per_s') / _median(base, 'tokens_per_s'):.2f}"
            )
        if args.variants:
            for name, extra in (
                ("ZeRO-3 full", ["train.deepspeed.stage=3"]),
                ("ZeRO-2 LoRA r16", ["train.deepspeed.stage=2", "train.method=lora"]),
            ):
                r = ours(root, args.steps, extra)
                print(
                    f"{name:<30}{r['tokens_per_s']:8.0f} tokens/s  final loss {r['final_loss']:.3f}  "
                    f"peak RSS/worker {r['peak_rss_mib']:6.0f} MiB"
                )
    ray.shutdown()


if __name__ == "__main__":
    main()
