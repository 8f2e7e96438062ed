"""An MLflow store as a plain, comparable tree: the behaviour oracle of the recorder.

Every run becomes one record (kind, name, status, its parent's key, tags, params, metric keys, artifact
paths, dataset inputs) with run ids replaced by the keys of the runs they point at and the test's folders by
placeholders, so two runs of the same sweep give equal trees. `compare` allows tags the golden file lacks (a
new tag is not a change of behaviour) and nothing else.

Regenerate a golden file on purpose only: `ER_RAY_UPDATE_GOLDEN=1 pytest tests/test_recorder.py`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from er_ray import tracking as T

GOLDEN_DIR = Path(__file__).parent / "golden"
# tags whose values are behaviour; the others (versions, checksums, git commit, user) only need to exist
VALUED_TAGS = (
    T.TAG_KIND,
    T.TAG_NAME,
    T.TAG_KEY,
    T.TAG_PRIMARY,
    T.TAG_SHARED,
    T.TAG_STUDY,
    T.TAG_OPTUNA_TRIAL,
)
VOLATILE_PARAMS = ("run_dir",)  # a timestamped folder
STAMP = re.compile(r"-\d{8}-\d{6}(-[0-9a-f]{4})?")  # a run folder's name inside a run name


def tree(uri: str, placeholders: dict[str, str]) -> list[dict]:
    """Every run of every experiment in the store at `uri`, normalised (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], max_results=5000)
    ]
    models: dict[str, list[str]] = {}
    for m in client.search_logged_models([e.experiment_id for e in client.search_experiments()]):
        models.setdefault(m.source_run_id, []).append(m.name)
    label = {r.info.run_id: r.data.tags.get(T.TAG_KEY) or r.data.tags.get(T.TAG_KIND, "?") for r in runs}

    def clean(value: str) -> str:
        for path, name in sorted(placeholders.items(), key=lambda kv: -len(kv[0])):
            value = value.replace(path, name)
        return value

    out = []
    for r in runs:
        tags = dict(r.data.tags)
        if tags.get(T.TAG_KIND) == "trial":  # keyed by Ray Tune's random trial id
            tags[T.TAG_KEY] = "trial/*"
        record = {
            "kind": tags.get(T.TAG_KIND),
            "name": STAMP.sub("-<stamp>", r.info.run_name),
            "status": r.info.status,
            "parent": label.get(tags.get("mlflow.parentRunId", ""), None),
            "tags": {
                k: (label.get(v, v) if k in VALUED_TAGS else "*")
                for k, v in sorted(tags.items())
                if k not in ("mlflow.parentRunId", "mlflow.runName")
            },
            "params": {
                k: ("*" if k in VOLATILE_PARAMS else clean(v)) for k, v in sorted(r.data.params.items())
            },
            "metrics": sorted(r.data.metrics),
            "artifacts": _artifacts(client, r.info.run_id),
            "models": sorted(models.get(r.info.run_id, [])),
            "inputs": sorted(f"{d.dataset.name}:{t.value}" for d in r.inputs.dataset_inputs for t in d.tags),
        }
        out.append(record)
    order = {k: i for i, k in enumerate(T.KINDS)}
    return sorted(out, key=lambda x: (order.get(x["kind"], 9), x["tags"].get(T.TAG_KEY, ""), x["name"]))


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return sorted(out)


def compare(actual: list[dict], name: str) -> None:
    """Assert `actual` equals the golden file `name` (new tags allowed); rewrite it when asked to."""
    path = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("ER_RAY_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert [_key(r) for r in actual] == [_key(r) for r in golden], "a different set of runs"
    for got, want in zip(actual, golden, strict=True):
        where = _key(want)
        assert {k: got["tags"].get(k) for k in want["tags"]} == want["tags"], f"tags of {where}"
        for field in ("status", "parent", "params", "metrics", "artifacts", "models", "inputs"):
            assert got[field] == want[field], f"{field} of {where}"


def _key(record: dict) -> str:
    return f"{record['kind']}:{record['tags'].get(T.TAG_KEY, '')}:{record['name']}"
