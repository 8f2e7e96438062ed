"""`er-ray attack MODEL_DIR` (declared in er_ray.cli): Clean%, Aua% and #Query of a saved ticket or Hugging Face
model under TextFooler, TextBugger and BERT-Attack, in this process; a table on stdout, summary.json /
examples.jsonl / deviations.md in the out dir. With several actors the CLI uses the Ray pool instead."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from er_ray import layout
from er_ray.config import AttackConfig, DataConfig, ExperimentConfig, UserError, config_from_dict, load_config

# the paper's attack samples (A.2.1): all 872 SST-2 validation examples, 500 random examples elsewhere
PAPER_SAMPLE = {"sst2": None}
PAPER_SAMPLE_DEFAULT = 500


@dataclass(frozen=True)
class AttackOptions:
    """`er-ray attack`'s options (None: the config's value, or the default)."""

    config: Path | None = None
    overrides: Sequence[str] = ()
    dataset: str | None = None
    split: str | None = None
    recipes: str | None = None  # comma-separated
    num_examples: str | None = None  # a count or "all"
    actors: int | None = None
    resources: str | None = None
    precision: str | None = None
    seed: int | None = None


def resolve(args: AttackOptions) -> tuple[ExperimentConfig, str]:
    """The experiment config with the command line's attack options applied, and the split to evaluate."""
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    else:
        files = {o.split("=", 1)[0].strip() for o in args.overrides}
        if args.dataset == "custom" and not {"data.train_file", "data.eval_file"} <= files:
            raise UserError(
                "--dataset custom needs its files: --config with a custom data section, or "
                "--set data.train_file=... --set data.eval_file=..."
            )
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


def evaluate(
    model_dir: Path,
    data: DataConfig,
    split: str,
    attack: AttackConfig,
    seed: int,
    progress: bool = True,
    masked_lm: str | None = None,
):
    """Load the split and run the evaluation in this process."""
    from tqdm import tqdm

    from er_ray.attacks.evaluate import attack_sample, default_resources, evaluate_robustness
    from er_ray.attacks.victim import check_victim, load_victim
    from er_ray.data import load_split

    check_victim(model_dir)
    dataset = load_split(data, split, seed, None)
    options = {"masked_lm": masked_lm or attack.masked_lm}
    model, tokenizer = load_victim(model_dir)
    offline = (
        default_resources("bertattack" in attack.recipes, **options)
        if attack.resources == "offline"
        else None
    )
    indices = attack_sample(dataset, attack.num_examples, seed)
    with tqdm(
        total=len(indices) * len(attack.recipes), desc="attack", unit="ex", disable=not progress
    ) as bar:
        return evaluate_robustness(
            model,
            tokenizer,
            dataset,
            attack,
            seed,
            data.max_length,
            indices,
            offline=offline,
            progress=bar.update,
        )


def report(model_dir: Path, out: Path | None, cfg: ExperimentConfig, split: str, result) -> int:
    out = out or layout.attack_folder(cfg.runtime.output_dir, model_dir, cfg.data.name, split, cfg.seed)
    paths = result.save(out)
    print(
        f"{model_dir} on {cfg.data.name}/{split}: clean accuracy over {result.num_clean} examples, "
        f"attacks on {len(result.indices)} (seed {cfg.seed}, resources {cfg.attack.resources}, "
        f"precision {result.info.get('precision', 'fp32')})"
    )
    print(result.table())
    print(f"saved: {paths['summary']}, {paths['examples']}, {paths['deviations']}")
    return 0
