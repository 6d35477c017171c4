#!/usr/bin/env bash
# SLQ on a GPU, one command (under 8 minutes on one H100/H200 is the budget), for whenever
# a GPU is at hand. Needs the GPU install: `bash scripts/setup.sh --gpu`.
#
#   1. every allocation phase (database, objective, sensitivity pass, RCO, EAR probe, write)
#      on a random-weight Llama with Llama-3.1-8B's shapes, built on the GPU (no download):
#      peak torch.cuda memory and wall per phase, beside the reference model's
#      (benchmarks/slq_memory.py --device cuda);
#   1b. the same phases with --offload (the 70B path: decoder blocks and candidates in
#      memory-mapped host files, one block on the GPU at a time) on the 8B shapes with
#      OFFLOAD_LAYERS decoder layers: the device peak the 70B prediction rests on;
#   2. the main job end to end on the reference model with --device cuda (its report
#      records the peak GPU memory and the wall).
# Results: benchmarks/results/gpu_smoke_<device>/, the device named in every JSON.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
LAYERS="${LAYERS:-32}"   # fewer decoder layers if the budget is tight; memory scales per layer
DEV=$("$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print(torch.cuda.get_device_name().replace(' ', '_'))")
OUT="benchmarks/results/gpu_smoke_$DEV"
mkdir -p "$OUT"
echo "[gpu_smoke] $DEV -> $OUT"

SECONDS=0
(cd benchmarks && "../$PY" slq_memory.py --device cuda --sizes ref 8b --layers "$LAYERS" \
  --out "../$OUT/slq_memory.json")
echo "[gpu_smoke] allocation phases: ${SECONDS}s"

SECONDS=0
(cd benchmarks && "../$PY" slq_memory.py --device cuda --sizes 8b --layers "${OFFLOAD_LAYERS:-8}" --rco-steps 1 \
  --offload "${TMPDIR:-/tmp}/slq-offload" --out "../$OUT/slq_memory.json")
echo "[gpu_smoke] allocation phases with --offload: ${SECONDS}s"

SECONDS=0
"$PY" -m vllm_slq.cli quantize smollm2-135m --target bpp=4.0 --device cuda --eval-tokens 8192 \
  --output "$OUT/smollm2-slq-bpp4" --overwrite
echo "[gpu_smoke] main job: ${SECONDS}s"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rep = json.loads((out / "smollm2-slq-bpp4" / "slq_report.json").read_text())
mem = json.loads((out / "slq_memory.json").read_text())
summary = {"device": mem["rows"][0]["device_name"],
           "main_job": {k: rep.get(k) for k in ("bpp", "bpp_all_params", "quantize_seconds",
                                                  "peak_device_memory_gb", "device", "dtype")},
           "main_job_ear": (rep.get("fidelity") or {}).get("teacher_forced", {}).get("ear"),
           "allocation_phases_mb": {r["size"]: r["phases"] for r in mem["rows"]},
           "allocation_wall_s": {r["size"]: r["wall_s"] for r in mem["rows"]}}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
PYEOF
