"""Early stopping pays: ASHA against random search without early stopping, same trials.

    python -m tailorlm.bench.tune --samples 12 --evals 9 --eval-every 4

Both sweeps sample the same points (seeded random search over lr, warmup) and train the same tiny
model on the same data, one trial at a time on a 2-CPU embedded Ray. For each sweep it prints:
- compute: optimizer steps summed over all trials, and the steps spent until the sweep first saw
  an eval loss within --eps (relative) of the random sweep's best (the reference);
- wall-clock for the same two points;
- Tune's overhead against ideal: sweep wall-clock over the seconds trials spent in the training
  loop itself (`loop_s`, steps plus evals), i.e. what start-up and scheduling cost short trials.
Target (issue #5): ASHA reaches the reference loss with <= 1/3 of random search's compute.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from tailorlm.bench.train import write_data_stage


def sweep_cfg(root: Path, scheduler: str, args):
    from tailorlm.config import load_config

    return load_config(
        None,
        [
            f"run.storage={root}",
            "run.name=bench",
            "train.method=full",
            "train.max_seq_len=128",
            "train.packing=true",
            "train.micro_batch_size=8",
            f"train.eval_every={args.eval_every}",
            "tune.enabled=true",
            f"tune.num_samples={args.samples}",
            "tune.searcher=random",
            f"tune.scheduler={scheduler}",
            f"tune.trial_max_steps={args.eval_every * args.evals}",
            "tune.search_space={train.lr: {loguniform: [1.0e-5, 1.0e-1]}, train.warmup_steps: {choice: [0, 4, 8]}}",
        ],
    )


def timeline(results) -> list[dict]:
    """Every eval report of every trial, in the order the (sequential) trials ran, with the steps
    each report cost since its trial's previous one."""
    trials = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or "eval_loss" not in df:
            continue
        df = df.sort_values("step")
        trials.append((float(df["timestamp"].min() - df["time_total_s"].min()), df))
    events = []
    for start, df in sorted(trials, key=lambda t: t[0]):
        last_step = 0
        for _, row in df.iterrows():
            events.append(
                {
                    "steps": int(row["step"]) - last_step,
                    "loss": float(row["eval_loss"]),
                    "time": float(row["timestamp"]),
                }
            )
            last_step = int(row["step"])
    return events


def to_reach(events: list[dict], target: float) -> tuple[int, float] | None:
    """(steps spent, unix time) at the first report within target, or None."""
    spent = 0
    for e in events:
        spent += e["steps"]
        if e["loss"] <= target:
            return spent, e["time"]
    return None


def run_one(root: Path, scheduler: str, args) -> dict:
    from tailorlm.runs import StageDir
    from tailorlm.tune.stage import run_sweep

    cfg = sweep_cfg(root, scheduler, args)
    sdir = StageDir(str(root / f"tune-{scheduler}"), "tune")
    t0 = time.time()
    results = run_sweep(cfg, str(root / "bench" / "data" / "kept"), sdir)
    wall = time.time() - t0
    events = timeline(results)
    # loop_s is cumulative per trial: a trial's last report holds its whole loop time
    loop_s = sum(
        df["loop_s"].max() for df in (r.metrics_dataframe for r in results) if df is not None and "loop_s" in df
    )
    return {
        "events": events,
        "wall": wall,
        "t0": t0,
        "loop_s": loop_s,
        "steps": sum(e["steps"] for e in events),
        "best": min(e["loss"] for e in events),
        "trials": len(results),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=12, help="trials per sweep")
    ap.add_argument("--evals", type=int, default=9, help="evaluations per full trial (ASHA rungs at 1, 3, 9)")
    ap.add_argument("--eval-every", type=int, default=4, help="optimizer steps between evaluations")
    ap.add_argument("--eps", type=float, default=0.01, help="relative distance to the reference best eval loss")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args(argv)

    from tailorlm.cluster import init_ray

    init_ray(num_cpus=args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data_stage(root)
        runs = {s: run_one(root, s, args) for s in ("none", "asha")}
    ref = runs["none"]["best"]
    target = ref * (1 + args.eps)
    print(
        f"\n{args.samples} trials x up to {args.evals * args.eval_every} steps; reference best eval loss "
        f"{ref:.4f} (random search, no early stopping); target <= {target:.4f}"
    )
    print(
        f"{'sweep':<10} {'best':>8} {'steps':>7} {'to target':>10} {'wall s':>8} {'to target s':>12} "
        f"{'loop s':>8} {'overhead':>9}"
    )
    reach = {}
    for name, r in runs.items():
        hit = to_reach(r["events"], target)
        reach[name] = hit[0] if hit else None
        wall_to = hit[1] - r["t0"] if hit else math.nan  # report timestamps have 1 s resolution
        print(
            f"{'random' if name == 'none' else 'ASHA':<10} {r['best']:8.4f} {r['steps']:7d} "
            f"{hit[0] if hit else 'never':>10} {r['wall']:8.1f} {wall_to:12.1f} {r['loop_s']:8.1f} "
            f"{r['wall'] / r['loop_s']:8.2f}x"
        )
    a, b = runs["asha"], runs["none"]
    print(f"ASHA / random compute, whole sweep: {a['steps'] / b['steps']:.2f} (target <= 0.33)")
    if reach["asha"]:
        print(f"ASHA / random compute to reach the reference loss: {reach['asha'] / reach['none']:.2f}")
    else:
        print("ASHA never reached the reference loss: it stopped the best trial early")
    print(f"ASHA / random wall-clock, whole sweep: {a['wall'] / b['wall']:.2f}")
    print(
        f"Tune overhead vs ideal (wall / time in training loops): random {b['wall'] / b['loop_s']:.2f}x, "
        f"ASHA {a['wall'] / a['loop_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
