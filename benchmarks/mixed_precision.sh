#!/usr/bin/env bash
# bf16 (and fp16 on a GPU) vs fp32 on the demo, same seed: prints validation mAP, macro-F1 and seconds per run.
#   bash benchmarks/mixed_precision.sh [extra train.py flags]      e.g. on a GPU: bash benchmarks/mixed_precision.sh
# train.py's --mixed-precision is passed too: its default 'auto' picks bf16 on a GPU when the launcher says 'no'.
# Runs land in benchmarks/results/mixed_precision/<precision>/ (ignored by git). On a CPU without bf16 units (no
# AVX512-BF16 / AMX) bf16 is many times slower than fp32: measure it on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/mixed_precision
precisions=${PRECISIONS:-"no bf16 $(python -c 'import torch; print("fp16" if torch.cuda.is_available() else "")')"}
for precision in $precisions; do
  rm -rf "$out/$precision"
  accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision "$precision" \
    train.py --mixed-precision "$precision" --output-dir "$out/$precision" "$@"
done
python - "$out" $precisions <<'PY'
import json, sys
out, precisions = sys.argv[1], sys.argv[2:]
print(f"{'precision':<10} {'mAP':>7} {'F1@0.5':>7} {'F1 tuned':>9} {'seconds':>8}")
for p in precisions:
    m = json.load(open(f"{out}/{p}/metrics.json"))
    v = m["validation"]
    print(f"{p if p != 'no' else 'fp32':<10} {v['mAP']:>7.4f} {v['f1_macro_at_0.5']:>7.4f} {v['f1_macro_tuned']:>9.4f} "
          f"{m['train_seconds']:>8.1f}")
PY
