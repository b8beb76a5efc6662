#!/bin/bash
# Issue 11's quality campaign on a lent GPU box, inside one time-limited command: default flags, both benchmark sets,
# all labels vs 50% more training labels hidden, and --na-policy fixmatch with hidden labels; several
# bench_quality.py chains at once, stopped at a deadline, the finished runs' results packed into one tarball.
#
#   bash benchmarks/gpu_quality.sh PYTHON SECONDS OUT_DIR [--epochs N] [--image-size PX] [--parallel K] [--workers W]
#       [--limit-groups G]   (a smoke run on G groups of each set)
#
# PYTHON runs the benchmarks (it needs requirements.txt's packages); SECONDS is the deadline for the trainings (a
# training still running then is stopped and left out); OUT_DIR receives machine.txt and quality.tgz (each finished
# run's bench_result.json, metrics.json, history.json and logs; no weights). Runs, in priority order: emoji default
# (seeds 0-4, all and hidden labels as pairs), Tabler default (seeds 0-2), then fixmatch with hidden labels (emoji
# seeds 0-4, Tabler 0-2); at most K trainings at once (default 6), each with W loader workers (default 2) and 2 torch
# threads.
# Measured on the H200 box (16 cores, 2026-12-04): eight trainings at once, 8 loader workers and 16 torch threads
# each (train.py ignored --cpu-threads beside a GPU until 87ede91), loaded the CPU to ~75 runnable threads and ran
# each at ~4 steps/s (MobileNetV2, 128 px, batch 32) with the GPU 10-60% busy: hence 2 torch threads each. With them
# (session 14, same box), eight trainings at once (this script twice: --parallel 6 at 128 px beside --parallel 2 at
# 224 px, --workers 2) ran at ~13 steps/s each (11-12 s per emoji epoch, ~200 s per 30-epoch run, load ~12, GPU 99%
# busy): 13 runs finished in a 500 s deadline, hence the defaults of 6 at once and 2 workers each.
# Back here: tar xzf quality.tgz -C DIR, then one table per set, e.g.
#   python -m benchmarks.combine_quality --name emoji_gpu DIR/default_emoji_* DIR/fixmatch_emoji_*
# A box without internet needs the missing packages as wheels (pip download --no-deps here); on 2026-12-04 it lacked
# datasets 5.2.0 and had huggingface_hub 1.33: carry datasets, dill, multiprocess, huggingface_hub 2.4.0, httpx2,
# httpcore2, truststore and timm 1.0.31, and the prepared benchmarks/data/{emoji,tabler,mobilenetv2_100.safetensors}.
set -u
PY=$1; SECONDS_LIMIT=$2; OUT=$3; shift 3
EPOCHS=30; PX=128; PARALLEL=6; WORKERS=2; LIMIT_GROUPS=0
while [ $# -gt 0 ]; do
  case $1 in
    --epochs) EPOCHS=$2; shift 2 ;;
    --image-size) PX=$2; shift 2 ;;
    --parallel) PARALLEL=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --limit-groups) LIMIT_GROUPS=$2; shift 2 ;;
    *) echo "error: unknown option '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
RUNS=$(mktemp -d /tmp/gpu_quality.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  lscpu | grep -E "Model name|^CPU\(s\)"
  "$PY" -c "import torch, timm, datasets; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
                                                'timm', timm.__version__, 'datasets', datasets.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# one training per bench_quality process (--jobs 1) so that K processes = K trainings
queue=()
for s in 0 1 2 3 4; do queue+=("emoji default= full $s" "emoji default= hidden $s"); done
for s in 0 1 2; do queue+=("tabler default= full $s" "tabler default= hidden $s"); done
for s in 0 1 2 3 4; do queue+=("emoji fixmatch=--na-policy@fixmatch hidden $s"); done
for s in 0 1 2; do queue+=("tabler fixmatch=--na-policy@fixmatch hidden $s"); done
start=$(date +%s)
for item in "${queue[@]}"; do
  read -r ds variant labels seed <<< "$item"
  variant=${variant//@/ }; name=${variant%%=*}
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 2; done
  [ $(( $(date +%s) - start )) -ge "$SECONDS_LIMIT" ] && break
  echo "t=$(( $(date +%s) - start ))s start $ds $name $labels s$seed"
  timeout $(( SECONDS_LIMIT - ($(date +%s) - start) )) "$PY" -m benchmarks.bench_quality --dataset "$ds" \
    --seeds "$seed" --label-sets "$labels" --variant "$variant --num-workers $WORKERS" --jobs 1 --threads 2 \
    --epochs "$EPOCHS" --image-size "$PX" --limit-groups "$LIMIT_GROUPS" --no-seed-recipe \
    --out-dir "$RUNS/${name}_${ds}_${labels}_s$seed" \
    > "$RUNS/log_${name}_${ds}_${labels}_s$seed.txt" 2>&1 &
done
wait
echo "t=$(( $(date +%s) - start ))s: $(ls "$RUNS"/*/runs/*/bench_result.json 2>/dev/null | wc -l) runs finished"
cd "$RUNS" && find . \( -name bench_result.json -o -path "*/model/metrics.json" -o -path "*/model/history.json" \
  -o -name "log_*" -o -name train.log \) -print0 | tar czf "$OUT/quality.tgz" --null -T -
