#!/usr/bin/env bash
# The prepared GPU run: one call on a lent GPU machine returns everything it measured in one file.
#   bash gpu_check.sh ARCHIVE.tar.gz              on CUDA; stops at once, loudly, where CUDA is absent
#   bash gpu_check.sh ARCHIVE.tar.gz --rehearse   the same steps on the CPU at tiny sizes (a rehearsal)
# Every result lands in RESULTS (default runs/gpu-check, which must not hold files yet) and, after
# every step, in ARCHIVE: RESULTS packed whole (exported model files left out), under 16 MB, since a
# device call returns at most 8 files. Each step runs under `timeout` inside a total of BUDGET seconds
# (default 450 on CUDA: one device call may last 600); SCALE=N multiplies every step's own limit (a
# slower machine). steps.tsv gives each step's rc, seconds and limit, its log (NAME.log) its output,
# including TORCH_LOGS' recompiles, graph breaks and skipped CUDA graphs. MNIST: $MNIST_DIR, else ./mnist (git-ignored; ../shared does not travel to a device).
# Needs only what the GPU image has (torch, onnx, onnxruntime, scipy, pytest): no make, no submitit.
set -u
cd "$(dirname "$0")" || exit 1
ARCHIVE=${1:-}
MODE=${2:-cuda}
if [ -z "$ARCHIVE" ] || [ $# -gt 2 ] || { [ "$MODE" != cuda ] && [ "$MODE" != --rehearse ]; }; then
  echo "usage: bash gpu_check.sh ARCHIVE.tar.gz [--rehearse]" >&2
  exit 2
fi
case $ARCHIVE in /*) ;; *) ARCHIVE=$OLDPWD/$ARCHIVE ;; esac
RESULTS=${RESULTS:-runs/gpu-check}
if [ -d "$RESULTS" ] && [ -n "$(ls -A "$RESULTS")" ]; then
  echo "error: $RESULTS already holds files; move them away or set RESULTS to a new folder" >&2
  exit 2
fi
mkdir -p "$RESULTS" "$(dirname "$ARCHIVE")" || exit 2
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export MNIST_DIR=${MNIST_DIR:-$PWD/mnist} PYTHONUNBUFFERED=1 TORCH_LOGS=${TORCH_LOGS-recompiles,graph_breaks,cudagraphs}
if [ "$MODE" = cuda ]; then DEV=cuda; BUDGET=${BUDGET:-450}; else DEV=cpu; BUDGET=${BUDGET:-3600}; fi
END=$(( $(date +%s) + BUDGET ))
printf 'step\trc\tseconds\tlimit\toutcome\n' > "$RESULTS/steps.tsv"

pack() {  # RESULTS as one archive, replaced whole; checkpoints left out too if it would pass 16 MB
  local skip=(--exclude='*.onnx' --exclude='*.pt2' --exclude='*.torchscript.pt' --exclude='*.lock')
  tar czf "$ARCHIVE.tmp" -C "$(dirname "$RESULTS")" "${skip[@]}" "$(basename "$RESULTS")"
  if [ "$(stat -c %s "$ARCHIVE.tmp")" -gt 16000000 ]; then
    tar czf "$ARCHIVE.tmp" -C "$(dirname "$RESULTS")" "${skip[@]}" --exclude='*.pt' "$(basename "$RESULTS")"
  fi
  mv "$ARCHIVE.tmp" "$ARCHIVE"
}

# step NAME CUDA_LIMIT CPU_LIMIT COMMAND...: run COMMAND under the limit (seconds; never past the
# budget's end), its output into RESULTS/NAME.log, its line into steps.tsv, then pack
step() {
  local name=$1 limit=$2 start rc left outcome
  [ "$DEV" = cpu ] && limit=$3
  limit=$(( limit * ${SCALE:-1} ))
  shift 3
  left=$(( END - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    printf '%s\t-\t0\t0\tskipped: the budget of %ss is spent\n' "$name" "$BUDGET" >> "$RESULTS/steps.tsv"
    echo "== $name skipped: the budget is spent"
    pack
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit}s)"
  start=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) outcome=ok ;;
    124|137) outcome="timed out: $name.log says how far it got (a train.py run cut in epoch 1 leaves no run folder)" ;;
    *) outcome="failed: see $name.log" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" "$outcome" >> "$RESULTS/steps.tsv"
  tail -n 3 "$RESULTS/$name.log"
  pack
  return $rc
}

# the data first: nothing else can run without it
step data 30 120 $PY -c 'import data
for split in ("train", "test"):
    x, y = data.load(split)
    print(split, tuple(x.shape), "images from", data.resolve_dir())' || { echo "error: the MNIST check failed (data.log); nothing else can run" >&2; exit 3; }

step env 30 60 bash -c "nvidia-smi; nproc; free -g; $PY -c '
import platform, torch
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"cudnn\", torch.backends.cudnn.version(), \"available\", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          \"bf16\", torch.cuda.is_bf16_supported(including_emulation=False))
try:
    import onnxruntime
    print(\"onnxruntime\", onnxruntime.__version__, onnxruntime.get_available_providers())
except ImportError as e:
    print(\"no onnxruntime:\", e)'"
if [ "$DEV" = cuda ] && ! $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "error: CUDA is not available here (env.log says why); nothing was trained. On a machine without" \
       "a GPU, bash gpu_check.sh ARCHIVE --rehearse runs the CPU rehearsal" | tee -a "$RESULTS/env.log" >&2
  pack
  exit 4
fi

# the step that matters: gap10k, the whole step replayed as CUDA graphs, the recipe's 19 epochs
# (metrics.csv: every epoch's seconds and accuracy; epoch 1 holds the capture)
if [ "$DEV" = cuda ]; then SIZE=(); else SIZE=(--epochs 2 --subset 1024); fi
step gap10k-whole-step 120 900 $PY train.py --model gap10k --device $DEV --whole-step --no-progress \
  --out "$RESULTS/gap10k-whole-step" "${SIZE[@]}"

# where the time goes, per variant (whole_step.explain): seconds per epoch, steps/s, kernels of
# 5 steps, one graph replay's time, recompiles, compile seconds, peak memory
if [ "$DEV" = cuda ]; then
  VARIANTS=(graphs amp+graphs graphs+compile compile); SIZE=()
else
  VARIANTS=(graphs amp+graphs); SIZE=(--epochs 2 --subset 1024)
fi
step explain-gap10k 120 900 $PY whole_step.py --model gap10k --device $DEV --variants "${VARIANTS[@]}" \
  --json "$RESULTS/explain-gap10k.json" "${SIZE[@]}"

# the device-aware tests: on the GPU only the CUDA cases (the CPU ones run in CI)
step tests-devices 90 600 $PY -m pytest -p no:cacheprovider -q -rws tests/test_devices.py \
  -k "$([ "$DEV" = cuda ] && echo cuda || echo 'cpu and augmentation or whole_step')"

# every recipe, one seed, with --whole-step: the "five recipes in under 90 s" target
if [ "$DEV" = cuda ]; then SIZE=(--set whole-step=on); else SIZE=(--models conv4_fc --set whole-step=on subset=2048); fi
step reproduce-whole-step 150 900 $PY reproduce.py --seeds 1 --device $DEV "${SIZE[@]}"
mkdir -p "$RESULTS/reproduce"
for d in results/reproduce/*whole-step*; do
  [ -f "$d/metrics.csv" ] && cp "$d/metrics.csv" "$RESULTS/reproduce/$(basename "$d").csv"
  [ -f "$d/summary.json" ] && cp "$d/summary.json" "$RESULTS/reproduce/$(basename "$d").json"
done
pack

# training throughput beside today's best (bench.py writes its JSON after every variant)
if [ "$DEV" = cuda ]; then
  SIZE=(--model gap10k --repeats 2 --variant eager cudagraphs whole-step amp+whole-step)
else
  SIZE=(--model bn_fc --steps 3 --repeats 1 --variant eager whole-step)
fi
step bench-train 90 600 $PY bench.py --device $DEV --task train --json "$RESULTS/bench-train.json" "${SIZE[@]}"

# exports of the whole-step gap10k, each verified on the 10,000 test images: one format a call, so
# one failure hides nothing; AOTInductor (a minute or more of compiling) alone and last
CKPT=$RESULTS/gap10k-whole-step/best.pt
[ -f "$CKPT" ] || CKPT=pretrained/gap10k.pt
step export 60 600 bash -c "rc=0; for f in onnx torchscript pt2; do echo \"== \$f\"; $PY export.py \
  --checkpoint '$CKPT' --format \$f --out '$RESULTS/exports' || rc=1; done; exit \$rc"
step export-aoti 150 900 $PY export.py --checkpoint "$CKPT" --format aoti --device $DEV --out "$RESULTS/exports"

pack
column -t -s "$(printf '\t')" "$RESULTS/steps.tsv" 2>/dev/null || cat "$RESULTS/steps.tsv"
echo "results in $RESULTS and $ARCHIVE ($(stat -c %s "$ARCHIVE") bytes)"
