"""Shared fixtures: tiny random BERT / RoBERTa classifiers (fast), the real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
BUCKET = "er-ray-test"


@pytest.fixture(autouse=True, scope="session")
def _offline_env(tmp_path_factory):
    """Tests never touch the network and never write caches into $HOME."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("ER_RAY_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    if "ER_RAY_DATA_DIR" not in __import__("os").environ:
        mp.setenv("ER_RAY_DATA_DIR", str(DATA_DIR))
    torch.set_num_threads(1)  # tiny models: a second thread costs more in sync than it gains
    yield
    mp.undo()


def tiny_config(kind: str = "bert", num_labels: int = 2, intermediate: int = 37):
    from transformers import BertConfig, RobertaConfig

    common = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if kind == "roberta":
        return RobertaConfig(vocab_size=120, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    return BertConfig(vocab_size=120, **common)


def tiny_model(kind: str = "bert", seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(kind))
    return model.eval()


def tiny_batch(seed: int = 0, batch: int = 4, tokens: int = 9, pad_from: int = 6):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, tokens), generator=gen)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, pad_from:] = 0  # one padded example
    ids[0, pad_from:] = 1
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(params=["bert", "roberta"])
def any_tiny_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT saved with the real MiniLM tokenizer: the pipeline's fast stand-in backbone."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from er_ray.model import load_tokenizer

    # benchmarks/gpu_check.sh carries MiniLM's tokenizer as files to machines without the MiniLM package
    tok = load_tokenizer(os.environ.get("ER_RAY_TEST_TOKENIZER", "minilm"))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def own_processes(title: str) -> list[int]:
    """PIDs of this test session's processes whose command line holds `title` (a Ray worker's title): only
    descendants of this pytest process, so that a fault test never kills another Ray on the same machine."""
    import psutil

    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                out.append(proc.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return out


def tiny_experiment(model_dir, out_dir, **over):
    """A config for the tiny backbone on a few real SST-2 rows; `over` = dotted overrides."""
    from er_ray.config import config_from_dict

    raw = {
        "name": "tiny",
        "seed": 3,
        "data": {
            "name": "sst2",
            "source": "local",
            "max_train_examples": 48,
            "max_eval_examples": 24,
            "max_length": 32,
        },
        "model": {"name_or_path": str(model_dir)},
        "search": {
            "batch_size": 8,
            "max_epochs": 2,
            "mini_epoch_steps": 1,
            "patience": 2,
            "gamma": 0.2,
            "lr": 1e-3,
            "lambda_head": 1e-3,
            "lambda_ffn": 1e-3,
            "adversary": {"kind": "freelb", "steps": 2},
        },
        "prune": {"head_ratio": 0.25, "ffn_ratio": 0.3},
        "finetune": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
        "runtime": {"output_dir": str(out_dir)},
    }
    return config_from_dict(raw, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def s3():
    """An S3 API server on a free local port; yields a URI prefix carrying pyarrow's endpoint options."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)  # before Ray starts: its workers inherit the credentials
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}/{{}}?scheme=http&endpoint_override={host}:{port}"
    mp.undo()
    server.stop()


class MlflowServer:
    """A real `mlflow server` on a free loopback port, over a sqlite store in `folder`; stop and start it again
    (the same port and store) to make an outage."""

    def __init__(self, folder: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.folder, self.proc = folder, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'server.db'}",
            "--artifacts-destination",
            (self.folder / "artifacts").as_uri(),
        ]
        with open(self.folder / "server.log", "ab") as log:  # the server keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


def start_driver(cfg, folder: Path, ray_session, **popen):
    """`er-ray run` of `cfg` in a process of its own (as a user starts it), joined to the test's Ray."""
    import json
    import os
    import subprocess
    import sys

    cfg_file = folder / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "er_ray.cli", "run", str(cfg_file)], env=env, **popen)
