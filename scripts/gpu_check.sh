#!/usr/bin/env bash
# The prepared check of a GPU machine (one GPU is enough), about 8 minutes:
#   1. the CUDA tests (tests/test_gpu.py): tree packing equals padded on the GPU and equals the CPU in fp32,
#      its gradients, bf16 within its precision, the trainer in fp32 and bf16, FSDP2 and ZeRO-3 over NCCL;
#   2. the 0.5b bench in bf16 with realistic lengths and TRL's DPOTrainer as a peer row.
# Everything it measures goes under $OUT (default: gpu_check/), with the GPU's name and the versions.
# usage: bash scripts/gpu_check.sh            (from the repository root, requirements-dev.txt installed)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python - <<'PY' | tee "$OUT/machine.txt"
import torch, transformers, accelerate
assert torch.cuda.is_available(), "no CUDA GPU visible: this check is for a GPU machine"
print("gpu:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__)
PY
status=0
timeout 300 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --junitxml "$OUT/test_gpu.xml" 2>&1 \
  | tee "$OUT/test_gpu.log" || status=1
timeout 300 python -m workbench bench --preset 0.5b --lengths realistic --bf16 true --device cuda --memory true \
  --json "$OUT/bench-0.5b.json" 2>&1 | tee "$OUT/bench-0.5b.log" || status=1
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED) -> $OUT"
exit $status
