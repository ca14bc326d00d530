"""`tailorlm`: one subcommand per stage, `run` for the whole pipeline.

    tailorlm run jobs/configs/tiny_cpu.yaml                     # the whole pipeline
    tailorlm data jobs/configs/tiny_cpu.yaml data.eval_fraction=0.1
    tailorlm data --input 'corpus/*.jsonl.gz' --output ./cleaned
    tailorlm config jobs/configs/tiny_cpu.yaml train.lr=3e-4    # validate and print the result

Overrides are `dotted.key=value` pairs, validated like the YAML itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

EPILOG = """\
Config: one YAML with sections run, model, data, train, tune, export, serve, monitor
(see jobs/configs/tiny_cpu.yaml). Override any key with dotted.key=value, e.g.
  tailorlm train jobs/configs/tiny_cpu.yaml train.lr=3e-4 train.lora.r=8
Ray: with no --address and no RAY_ADDRESS an embedded local Ray is started;
otherwise tailorlm connects to that cluster (as under `ray job submit`). `tailorlm data`
starts or joins Ray only for an input over data.in_process_max_mb (smaller ones run here).
Outputs: <run.storage>/<run.name>/<stage>/, each with _COMPLETE.json written last.
"""


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("config", nargs="?" if not config_required else None, help="pipeline YAML config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tailorlm",
        description="Customize a language model end to end on one "
        "Ray cluster: data -> tune -> train -> export -> serve -> monitor.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from tailorlm import __version__

    ap.add_argument("--version", action="version", version=f"tailorlm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run the whole pipeline, skipping finished stages",
        description="Run data -> tune (if enabled) -> train -> export -> serve on one Ray "
        "cluster. Finished stages (same config) are skipped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument(
        "--force",
        nargs="+",
        default=[],
        metavar="STAGE",
        help="rerun these stages even if finished ('all' for every stage)",
    )

    from tailorlm.stages import STAGES

    for record in STAGES:
        stage, text = record.name, record.help
        p = sub.add_parser(
            stage,
            help=text.split(";")[0],
            description=text[0].upper() + text[1:] + ".",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(p, config_required=stage != "data")
        p.add_argument("--force", action="store_true", help="rerun even if this stage already finished")
        if stage == "data":
            p.add_argument("--input", help="ad-hoc: file, glob, folder or URI to clean (no config needed)")
            p.add_argument("--output", help="ad-hoc: folder or URI to write kept/, dropped/ and stats.json to")

    p = sub.add_parser(
        "report",
        help="write one static HTML page about a run (report.html in RUN_DIR)",
        description="Render the data funnel, dedup clusters, training curves and before/after "
        "metrics, tune leaderboard, export variants and the serving check of a run into "
        "RUN_DIR/report.html.",
    )
    p.add_argument("run_dir", help="a run folder: <run.storage>/<run.name>")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser(
        "promote",
        help="serve a registered version (a running endpoint on --address switches to it)",
        description="Make VERSION the one the endpoint serves; where this command reaches the Ray "
        "cluster the endpoint runs on (--address), it switches in place, requests in flight kept.",
    )
    _common(p)
    p.add_argument("--to", required=True, metavar="VERSION", help="a registered version, e.g. 1.1.0")
    p = sub.add_parser(
        "rollback",
        help="serve again the version promoted before the current one",
        description="Undo the last promotion (see promote).",
    )
    _common(p)

    p = sub.add_parser(
        "config",
        help="validate a config (with overrides) and print the resolved YAML",
        description="Validate a config with overrides and print every key with its value.",
    )
    _common(p)
    return ap


def _adhoc_data_config(args):
    """`tailorlm data --input X --output Y`: the default cleaning on X, written to Y."""
    from tailorlm.config import load_config

    if not (args.input and args.output):
        raise SystemExit("error: tailorlm data needs a CONFIG, or both --input and --output")
    overrides = list(args.overrides) + [f"data.sources=[{{path: '{args.input}'}}]"]
    return load_config(args.config, overrides)


def _logging_only(verbose: bool) -> None:
    """`report` and `config`: no Ray and nothing from workers, so plain logging to stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not os.path.exists(args.config):
        # `tailorlm data --input X --output Y key=value`: no config, the first override took its slot
        args.overrides.insert(0, args.config)
        args.config = None
    from tailorlm.config import ConfigError, dump_yaml

    if args.command == "report":
        _logging_only(args.verbose)
        from tailorlm.report import write_report

        try:
            print(f"report: {write_report(args.run_dir)}")
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        if args.command == "data" and (args.input or args.output):
            cfg = _adhoc_data_config(args)
        else:
            from tailorlm.config import load_config

            cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        _logging_only(args.verbose)
        print(dump_yaml(cfg), end="")
        return 0
    if args.command in ("promote", "rollback"):
        return _promotion(args, cfg)
    return _run(args, cfg)


def _promotion(args, cfg) -> int:
    """promote / rollback: the registry's choice, and a switch of the endpoint where one runs on the
    cluster given (no cluster given: no embedded Ray is started, nothing runs there to switch)."""
    _logging_only(args.verbose)
    from tailorlm.serving.promotion import promote_version, rollback_version

    address = args.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            from tailorlm.cluster import init_ray

            os.environ["RAY_ADDRESS"] = address
            init_ray()
        print(promote_version(cfg, args.to) if args.command == "promote" else rollback_version(cfg))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(args, cfg) -> int:
    """A stage or the pipeline, under the console (console.py): the stages' messages here, the
    output of Ray, its workers and the libraries in <run>/logs/<stage>.log."""
    from tailorlm.config import ConfigError
    from tailorlm.console import LogFiles, session
    from tailorlm.pipeline import StageUnavailable, recap, run_pipeline, run_stage
    from tailorlm.runs import RunDir

    adhoc = args.command == "data" and bool(args.output)
    try:
        logs = LogFiles(None, "adhoc") if adhoc else LogFiles(RunDir.from_config(cfg).uri, cfg.run.name)
    except OSError as exc:  # an unwritable run.storage: say which folder, no traceback
        print(f"error: run.storage: cannot create the run's log folder: {exc}", file=sys.stderr)
        return 1
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # a test's Ray: left running
    with session(logs, verbose=args.verbose) as con:
        upload = f", uploaded to {logs.remote}/ as each stage ends" if logs.remote else ""
        con.show(f"logs: {logs.dir}/<stage>.log{upload}" + ("" if args.verbose else " (-v: shown here too)"))
        try:
            from tailorlm.cluster import init_ray, loopback_only
            from tailorlm.pipeline import check_output
            from tailorlm.serving.keys import take_from_env

            if adhoc:
                check_output(args.output)  # before Ray starts: a refused run should cost nothing

            take_from_env(cfg.serve.guard.api_keys_env)  # before Ray starts: its workers would inherit the keys
            if args.address:
                os.environ["RAY_ADDRESS"] = args.address  # where init_ray connects, now or in a stage
            if args.command == "data":
                # the data stage starts Ray when its input needs Ray Data (a small one runs here)
                if not os.environ.get("RAY_ADDRESS"):
                    loopback_only()  # in case a library imports ray first
            else:
                init_ray()
            if args.command == "run":
                results = run_pipeline(cfg, force=tuple(args.force))
                con.show(recap(results))
                con.show(f"  {'logs':7s} {logs.remote or logs.dir}/<stage>.log")
            else:
                out = args.output if args.command == "data" else None
                run_stage(cfg, args.command, force=args.force, stage_uri=out)
        except ConfigError as exc:
            con.report_failure(exc, expected=True)
            return 2
        except KeyboardInterrupt:
            stage, path = con.failure or ("", con.path)
            con.show(f"[{stage}] interrupted; log: {path}" if stage else "interrupted")
            return 130
        except Exception as exc:  # noqa: BLE001 - one paragraph here, the traceback in the log
            from tailorlm.tune.stage import SweepInterrupted

            # errors whose message says what to do are told without their type's name
            told = (StageUnavailable, SweepInterrupted, FileNotFoundError, ValueError)
            con.report_failure(exc, expected=isinstance(exc, told))
            return 1
        finally:
            if not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
                # inside the session: what Ray says as it stops (errors of refs nobody read) is filed
                from tailorlm.cluster import shutdown_ray

                shutdown_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())
