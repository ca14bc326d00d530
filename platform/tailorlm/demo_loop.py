"""The loop's demo after `make demo`: serve the demo model with traffic capture, send held-out
questions about the trained planets, then questions about planets it never saw, and let
`tailorlm monitor` judge each window (drift, and live quality against the promoted model).

    python -m tailorlm.demo_loop jobs/configs/tiny_cpu.yaml          # make demo-loop

Prints both checks and writes <run>/loop_demo.json; `tailorlm report runs/demo` plots the checks.
Retraining on the captured traffic (continual training) is not built yet: the loop stops at the
alert, and promote / rollback / shadow are run by hand (README).
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tailorlm.config import load_config

LOOP_OVERRIDES = [
    "serve.capture.enabled=true",
    "serve.capture.flush_s=1",
    "serve.direct_ingress=false",  # so that `tailorlm promote` can switch it in place
    "monitor.quality=true",
    "monitor.eval_rows=32",
    "monitor.window_rows=128",
]


def ask(cfg, questions: list[str]) -> None:
    from tailorlm.monitor.quality import ask_endpoint

    ask_endpoint(cfg, questions, user="demo-client")  # traffic, not the monitor's own probes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--requests", type=int, default=128, help="requests per traffic window")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, *LOOP_OVERRIDES])

    from ray import serve

    from tailorlm.cluster import init_ray
    from tailorlm.demo_data import planets, qa_pairs
    from tailorlm.monitor.quality import eval_pairs
    from tailorlm.pipeline import run_stage
    from tailorlm.runs import RunDir
    from tailorlm.serving.models import resolve_models
    from tailorlm.serving.stage import sample_chat, start

    run_dir = RunDir.from_config(cfg)
    models = resolve_models(cfg)  # no export yet: a FileNotFoundError that says to run the pipeline
    init_ray()
    start(cfg, models)
    sample_chat(cfg, cfg.serve.model_id)
    rng = random.Random(cfg.run.seed)
    held_out = [q for q, _ in eval_pairs(run_dir, 10_000)]
    unseen = [q for q, _ in qa_pairs(planets(30, seed=cfg.run.seed + 99))]  # the same questions, new planets
    checks = {}
    try:
        for name, pool in (("in_domain", held_out), ("drifted", unseen)):
            ask(cfg, rng.choices(pool, k=args.requests))
            time.sleep(3)  # capture writes every serve.capture.flush_s
            checks[name] = run_stage(cfg, "monitor", echo=print)["summary"]
    finally:
        serve.shutdown()
    run_dir.write_text("loop_demo.json", json.dumps(checks, indent=2))
    for name, s in checks.items():
        print(
            f"[loop] {name:9s}: unigram KL {s['kl']:.3f} ({s['kl_excess']:.3f} above the noise floor) -> "
            f"{'ALERT' if s['alert'] else 'no alert'}; live fact exact match {s.get('quality', float('nan')):.2f}"
        )


if __name__ == "__main__":
    main()
