"""What a sweep costs: ASHA against random search, and Tune's overhead on the training itself.

    python -m tailorlm.bench.tune --samples 12 --evals 9 --eval-every 3
    python -m tailorlm.bench.tune --config jobs/configs/tiny_cpu.yaml --schedulers asha   # the demo's sweep

Each sweep samples the same points (seeded random search over lr, warmup; or --config's own space
on the data its data stage writes) and trains the same tiny model on the same data, on an embedded
Ray of --cpus CPUs. Every sweep runs once per trial path (--paths): `plain`, today's trial (a driver
that prepares the data and runs a TorchTrainer of train.num_workers workers), and `fast`, the
default (the data prepared once per sweep, each trial in Ray Train's local mode inside a Tune
process reused between trials; tune/stage.py). For each sweep it prints:
- compute: optimizer steps summed over all trials, and the steps spent until the sweep first saw
  an eval loss within --eps (relative) of the random sweep's best (the reference);
- wall-clock for the same two points;
- R_tune = sweep wall-clock / (seconds all trials spent in the training loop, `loop_s`: steps plus
  evals, / max_concurrent_trials): 1.0 would be a sweep that costs only its training;
- where the other seconds go, per trial: data preparation, Train start (controller, worker group,
  dataset set-up), imports, model load, DeepSpeed init, first batch, evals, checkpoint writes, and
  the rest (Tune scheduling, process start, teardown). The fast path's once-per-sweep prepare runs
  beside Tune's start (tune/fast.SweepData), so it is shown but not on the sweep's clock.
Targets: ASHA reaches the reference loss with <= 1/3 of random search's compute (issue #5);
R_tune <= 1.5 (issue #19).
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

    if args.config:  # the config's own sweep (its data stage ran into root), under this scheduler
        return load_config(
            args.config, [f"run.storage={root}", "run.name=bench", f"tune.scheduler={scheduler}", *args.set]
        )
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
            f"tune.max_concurrent_trials={args.concurrency}",
            "tune.search_space={train.lr: {loguniform: [1.0e-5, 1.0e-1]}, train.warmup_steps: {choice: [0, 4, 8]}}",
        ],
    )


def timeline(results) -> list[dict]:
    """Every eval report of every trial, in the order the trials ran, with the steps each report
    cost since its trial's previous one."""
    events = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or "eval_loss" not in df:
            continue
        last_step = 0
        for _, row in df.sort_values("step").iterrows():
            events.append({"steps": int(row["step"]) - last_step, "loss": float(row["eval_loss"]), "time": row["at"]})
            last_step = int(row["step"])
    return sorted(events, key=lambda e: e["time"])


def to_reach(events: list[dict], target: float) -> tuple[int, float] | None:
    """(steps spent, unix time) at the first report within target, or None."""
    spent = 0
    for e in events:
        spent += e["steps"]
        if e["loss"] <= target:
            return spent, e["time"]
    return None


# a trial's seconds outside the loop, in the order they happen (phase_* of its last report), and in it
PHASES = [
    ("prepare_s", "data prepare (tokenize, rank shards)"),
    ("trial_setup_s", "trial set-up (config, preflight)"),
    ("start_s", "Train start (controller, workers, datasets)"),
    ("import_s", "imports (torch, DeepSpeed)"),
    ("model_s", "shm comm build check + model load"),
    ("ds_init_s", "DeepSpeed init"),
    ("first_batch_s", "loop: first batch"),
    ("eval_s", "loop: evals"),
    ("steps_s", "loop: steps"),
    ("ckpt_s", "reports to Tune, checkpoint writes"),
]


def breakdown(results) -> list[dict]:
    """Per trial: its phases' seconds (the last report's phase_* values) and loop_s."""
    out = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or "loop_s" not in df:
            continue
        last = df.sort_values("step").iloc[-1]
        row = {k: float(last.get(f"phase_{k}", 0.0) or 0.0) for k, _ in PHASES if k != "steps_s"}
        row["loop_s"] = float(last["loop_s"])
        row["steps_s"] = row["loop_s"] - row["eval_s"] - row["first_batch_s"]
        out.append(row)
    return out


def run_one(root: Path, scheduler: str, fast: bool, args) -> dict:
    from tailorlm.runs import StageDir
    from tailorlm.tune.stage import run_sweep

    cfg = sweep_cfg(root, scheduler, args)
    sdir = StageDir(str(root / f"tune-{scheduler}-{'fast' if fast else 'plain'}"), "tune")
    stats: dict = {}
    t0 = time.time()
    results = run_sweep(cfg, str(root / "bench" / "data" / "kept"), sdir, fast=fast, stats=stats)
    wall = time.time() - t0
    for r in results:  # report times: Tune's timestamp has 1 s resolution; the trial's own clock is finer
        df = r.metrics_dataframe
        if df is not None and "timestamp" in df:
            df["at"] = df["timestamp"]
    events = timeline(results)
    trials = breakdown(results)
    # loop_s is cumulative per trial: a trial's last report holds its whole loop time
    loop_s = sum(t["loop_s"] for t in trials)
    conc = cfg.tune.max_concurrent_trials
    return {
        "events": events,
        "wall": wall,
        "t0": t0,
        "loop_s": loop_s,
        "r_tune": wall / (loop_s / conc),
        "concurrency": conc,
        "steps": sum(e["steps"] for e in events),
        "best": min(e["loss"] for e in events),
        "trials": trials,
        "n_trials": len(results),
        "stats": stats,
    }


def print_breakdown(runs: dict) -> None:
    """Seconds per trial (mean over a sweep's trials), one column per sweep."""
    names = list(runs)
    print("\nwhere a trial's seconds go (mean per trial; the rest is per trial of the sweep's wall-clock):")
    print(f"{'':<46}" + "".join(f"{n:>14}" for n in names))
    for key, label in PHASES:
        vals = []
        for n in names:
            ts = runs[n]["trials"]
            vals.append(sum(t[key] for t in ts) / max(1, len(ts)))
        print(f"{label:<46}" + "".join(f"{v:14.1f}" for v in vals))
    once = [runs[n]["stats"].get("prepare_beside_s", 0.0) / max(1, runs[n]["n_trials"]) for n in names]
    print(f"{'data prepare once per sweep (beside), / trials':<46}" + "".join(f"{v:14.1f}" for v in once))
    rest = []
    for n in names:
        r = runs[n]
        accounted = sum(sum(t[k] for k, _ in PHASES) for t in r["trials"]) / r["concurrency"]
        rest.append((r["wall"] - r["stats"].get("prepare_s", 0.0) - accounted) / max(1, r["n_trials"]))
    print(f"{'rest: Tune scheduling, process start, teardown':<46}" + "".join(f"{v:14.1f}" for v in rest))
    print(f"{'R_tune (wall / (loop_s / concurrency))':<46}" + "".join(f"{runs[n]['r_tune']:13.2f}x" for n in names))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=12, help="trials per sweep")
    ap.add_argument("--evals", type=int, default=9, help="evaluations per full trial (ASHA rungs at 1, 3, 9)")
    ap.add_argument("--eval-every", type=int, default=4, help="optimizer steps between evaluations")
    ap.add_argument("--eps", type=float, default=0.01, help="relative distance to the reference best eval loss")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=1, help="tune.max_concurrent_trials (not with --config)")
    ap.add_argument(
        "--paths",
        default="fast,plain",
        help="trial paths to run, in this order: fast (the default path; first, so the baseline's "
        "leftover worker processes do not share its CPUs), plain (the baseline)",
    )
    ap.add_argument("--schedulers", default="none,asha", help="none (random search alone), asha")
    ap.add_argument("--config", help="a pipeline config: run its data stage, then its own sweep")
    ap.add_argument("--set", action="append", default=[], help="with --config: a dotted override (repeatable)")
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    schedulers = [s for s in args.schedulers.split(",") if s]

    from tailorlm.cluster import init_ray

    init_ray(num_cpus=args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.config:
            from tailorlm.pipeline import run_stage

            t0 = time.time()
            run_stage(sweep_cfg(root, schedulers[0], args), "data", echo=lambda s: None)
            print(f"[bench] data stage of {args.config}: {time.time() - t0:.0f} s")
        else:
            write_data_stage(root)
        runs = {f"{p}-{s}": run_one(root, s, p == "fast", args) for p in paths for s in schedulers}
    print(
        f"\n{'sweep':<12} {'trials':>6} {'best':>8} {'steps':>7} {'to target':>10} {'wall s':>8} "
        f"{'to target s':>12} {'loop s':>8} {'R_tune':>8}"
    )
    for name, r in runs.items():
        path, sched = name.split("-")
        ref = runs.get(f"{path}-none", r)["best"]
        hit = to_reach(r["events"], ref * (1 + args.eps))
        r["reach"] = hit[0] if hit else None
        wall_to = hit[1] - r["t0"] if hit else math.nan  # report timestamps have 1 s resolution
        print(
            f"{name:<12} {r['n_trials']:>6} {r['best']:8.4f} {r['steps']:7d} {hit[0] if hit else 'never':>10} "
            f"{r['wall']:8.1f} {wall_to:12.1f} {r['loop_s']:8.1f} {r['r_tune']:7.2f}x"
        )
    print("(to target: within --eps of the same path's random-search best; R_tune target <= 1.5)")
    for path in paths:
        a, b = runs.get(f"{path}-asha"), runs.get(f"{path}-none")
        if a and b:
            print(
                f"{path}: ASHA / random compute, whole sweep {a['steps'] / b['steps']:.2f} (target <= 0.33); "
                + (
                    f"to reach the reference loss {a['reach'] / b['reach']:.2f}; "
                    if a["reach"] and b["reach"]
                    else "ASHA never reached the reference loss; "
                )
                + f"wall-clock {a['wall'] / b['wall']:.2f}"
            )
    print_breakdown(runs)


if __name__ == "__main__":
    main()
