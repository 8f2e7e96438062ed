"""`er-ray check / run / bench` (and the subcommands other modules register).

Bad input raises `UserError` anywhere below; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from er_ray.config import ExperimentConfig, UserError, load_config, settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep the message to one line
        raise UserError(message)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="experiment YAML (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set search.gamma=0.05 (repeatable)")  # fmt: skip


def check_config(cfg: ExperimentConfig) -> None:
    """Schema is checked by loading; here the local paths it names (nothing is downloaded or loaded)."""
    from er_ray import data
    from er_ray.model import resolve_model_path

    data.check_data(cfg.data, settings().data_dir)
    path = resolve_model_path(cfg.model.name_or_path)
    local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if local and not (Path(path).expanduser() / "config.json").is_file():
        raise UserError(f"model.name_or_path '{cfg.model.name_or_path}' is not a Hugging Face model directory")


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_config(cfg)
    print(f"{args.config}: ok ({cfg.method} on {cfg.data.name}, model {cfg.model.name_or_path})")
    return 0


def print_results(rows: list[dict]) -> None:
    """One line per ticket; blank where a value was not measured (never a zero)."""
    from rich.console import Console
    from rich.table import Table

    from er_ray.tracking import ATTACKS, aua, queries

    attacks = [a for a in ATTACKS if any(aua(a) in r for r in rows)]
    table = Table(title="er-ray results")
    cols = ["method", "gamma", "heads", "ffn", "stop epoch", "clean %", *[f"aua % {a}" for a in attacks],
            *[f"#query {a}" for a in attacks], "search s", "fine-tune s", "params"]  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")

    def fmt(v, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for r in rows:
        stop = "" if r["stop_epoch"] is None else f"{r['stop_epoch']:.2f}{'' if r['converged'] else ' (cap)'}"
        table.add_row(
            r["method"], fmt(r["gamma"], "g"), fmt(r["head_ratio"], ".3g"), fmt(r["ffn_ratio"], ".3g"), stop,
            fmt(100 * r["clean_acc"], ".1f"), *[fmt(_pct(r.get(aua(a))), ".1f") for a in attacks],
            *[fmt(r.get(queries(a)), ".1f") for a in attacks],
            fmt(r["search_seconds"], ".1f"), fmt(r["finetune_seconds"], ".1f"), fmt(r["params"], ","),
        )  # fmt: skip
    # off a terminal (a log, CI) rich would squeeze the table into 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=240)
    console.print(table)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def preflight(cfg: ExperimentConfig) -> None:
    """Read the data and the tokenizer here, before any worker starts: bad data or a bad model name is then
    a one-line error with nothing written (a worker's error would surface as a failed trial)."""
    from er_ray import data
    from er_ray.model import load_tokenizer

    data.load_splits(cfg.data, cfg.seed, settings().data_dir)
    load_tokenizer(cfg.model.name_or_path)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_config(cfg)
    preflight(cfg)
    if args.no_ray:
        from er_ray.methods import run_experiment

        rows = []
        for method in cfg.methods():
            _, results = run_experiment(cfg.for_method(method), progress=True)
            rows += [r.to_json() for r in results]
    else:
        from er_ray.orchestration.pipeline import run_pipeline

        rows = run_pipeline(cfg, resume=args.resume)
    print_results(rows)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from er_ray import bench

    if args.trajectory:
        try:
            gammas = [float(g) for g in args.gammas.split(",")]
        except ValueError:
            raise UserError(f"--gammas must be comma-separated numbers, got '{args.gammas}'") from None
        if not args.trajectory.is_file():
            raise UserError(f"no trajectory file at {args.trajectory}")
        bench.sweep_cost(str(args.trajectory), gammas)
    else:
        precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
        bench.run_benchmark(args.model, args.batch_size, args.max_length, args.repeats, args.threads,
                            precisions=precisions or ("fp32",), device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="er-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("check", help="validate a config and the local paths it names")
    _config_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="run a config's pipeline on Ray: search, tickets, attacks, MLflow")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the latest run of this config after a crash")
    p.add_argument("--no-ray", action="store_true",
                   help="run search, draw, rewind and fine-tune in this process (no Ray, MLflow or attacks)")  # fmt: skip
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="time plain, FreeLB and pruned-ticket steps and inference, interleaved")
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="fp32", help="comma-separated, interleaved: e.g. fp32,bf16 (or auto, fp16)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--trajectory", type=Path, help="instead: the cost of a gamma sweep read off a trajectory.pt")
    p.add_argument("--gammas", default="0.05,0.1,0.15,0.2", help="with --trajectory: the sweep's gamma values")
    p.set_defaults(func=cmd_bench)

    from er_ray.attacks import cli as attack_cli
    from er_ray.orchestration import optuna_tune
    from er_ray.report import cli as report_cli

    for module in (attack_cli, optuna_tune, report_cli):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as err:
        print(f"er-ray: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
