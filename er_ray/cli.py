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


def print_results(results: list) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="er-ray results")
    for col in ("method", "gamma", "heads", "ffn", "stop epoch", "clean %", "search s", "fine-tune s", "params"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r.method, "" if r.gamma is None else f"{r.gamma:g}", f"{r.head_ratio:.3g}", f"{r.ffn_ratio:.3g}",
            "" if r.stop_epoch is None else f"{r.stop_epoch:.2f}{'' if r.converged else ' (cap)'}",
            f"{100 * r.clean_acc:.1f}", f"{r.search_seconds:.1f}", f"{r.finetune_seconds:.1f}", f"{r.params:,}",
        )  # fmt: skip
    Console().print(table)


def cmd_run(args: argparse.Namespace) -> int:
    from er_ray.methods import run_experiment

    cfg = load_config(args.config, args.overrides)
    check_config(cfg)
    _, results = run_experiment(cfg, progress=True)
    print_results(results)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from er_ray.bench import run_benchmark

    run_benchmark(args.model, args.batch_size, args.max_length, args.repeats, args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="er-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("check", help="validate a config and the local paths it names")
    _config_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="run a config's pipeline (search, draw, rewind, fine-tune) in this process")
    _config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="time a plain, a FreeLB and a pruned-ticket training step, interleaved")
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_bench)

    import importlib.util

    if importlib.util.find_spec("er_ray.attacks.cli"):  # TODO(issue 3): import directly once it lands
        from er_ray.attacks import cli as attack_cli

        attack_cli.add_parser(sub)
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
