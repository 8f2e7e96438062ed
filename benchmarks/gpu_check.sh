#!/usr/bin/env bash
# The first minutes on a borrowed GPU, prepared: the library's CUDA tests, then `er-ray bench` at BERT-base's
# shape with random weights (timing only) in fp32, bf16 and fp16 interleaved, its JSON rewritten after every
# round, so a machine taken back early still leaves figures. About 5 minutes on one GPU.
#
# Needs only torch, transformers (4.x: er-ray pins <5), pydantic, PyYAML, pandas, safetensors, tqdm and pytest: no Ray, MLflow,
# textattack or the packaged MiniLM (whose tokenizer, the vocabulary BERT-base uses, is carried as files).
#
#   benchmarks/gpu_check.sh --prepare DIR        here: MiniLM's tokenizer and the SST-2 rows into DIR, to carry
#   benchmarks/gpu_check.sh --from DIR [--out OUT] [--device cuda|cpu]
#
# `--device cpu` runs the same steps at a tiny shape in seconds; the test suite runs it so that this script
# cannot rot (tests/test_precision.py).
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda out=gpu-check from=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare)
      mkdir -p "$2/data/sst2"
      python3 -c "from er_ray.model import load_tokenizer; load_tokenizer('minilm').save_pretrained('$2/tokenizer')"
      cp "${ER_RAY_DATA_DIR:-../shared/data}"/sst2/{train,validation}.tsv "$2/data/sst2/"
      echo "gpu_check.sh: $2 holds the tokenizer and SST-2's rows; carry it and pass --from $2"
      exit 0 ;;
    --from) from=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$from" ] || { echo "gpu_check.sh: --from DIR is needed (made here by --prepare DIR)" >&2; exit 2; }
python3 - <<'PY'
import importlib.util, sys
need = ["torch", "transformers", "pydantic", "yaml", "pandas", "safetensors", "tqdm", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: missing Python packages: {', '.join(missing)}")
PY
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ER_RAY_DATA_DIR="$from/data" HF_HUB_OFFLINE=1 \
  ER_RAY_TEST_TOKENIZER="$from/tokenizer"
python3 -c "import torch, transformers, platform; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available()
else platform.processor())" | tee "$out/env.txt"
# the CUDA tests of the library (skipped, and said so, without a GPU)
python3 -m pytest -q -rs -p no:cacheprovider tests/test_precision.py -k cuda 2>&1 | tee "$out/tests.txt" \
  || echo "gpu_check.sh: some CUDA tests failed (see $out/tests.txt); timing goes on"
if [ "$device" = cuda ]; then
  shape=(--geometry bert-base --precision fp32,bf16,fp16 --repeats 5)
else
  shape=(--geometry tiny --precision fp32 --repeats 1 --steps 2 --batch-size 4 --max-length 32)
fi
python3 -m er_ray.cli bench "${shape[@]}" --device "$device" --tokenizer "$from/tokenizer" \
  --json "$out/bench.json" | tee "$out/bench.txt"
if [ "$device" = cuda ]; then  # bert-large only where a step takes milliseconds
  python3 -m er_ray.cli bench --geometry bert-large --precision fp32,bf16 --repeats 3 --device cuda \
    --tokenizer "$from/tokenizer" --json "$out/bench-large.json" | tee "$out/bench-large.txt"
fi
echo "gpu_check.sh: done; figures in $out/bench.json"
