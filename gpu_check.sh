#!/usr/bin/env bash
# The prepared GPU run: `make gpu-check OUT=DIR` (or `bash gpu_check.sh DIR`). Every result lands in
# DIR; each step is time-boxed so a slow one cannot eat the rest (about 10 minutes in all on one GPU).
# MNIST comes from $MNIST_DIR, else ./mnist (git-ignored: `cp -r ../shared/mnist mnist` before a run
# on a machine that gets only the repository). On a machine without CUDA it runs the same steps on
# the CPU with tiny settings: a rehearsal, so the first GPU run is not the script's first run.
set -u
OUT=${1:-gpu-check}
mkdir -p "$OUT"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export MNIST_DIR=${MNIST_DIR:-$PWD/mnist} PYTHONUNBUFFERED=1
CUDA=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$CUDA" = 1 ]; then DEV=cuda; SMALL=""; else DEV=cpu; SMALL=1; fi
: > "$OUT/steps.txt"

# the whole run fits BUDGET seconds (default 570, inside a 10-minute lease): a step gets at most its
# own limit and what is left; with under 20 s left it is skipped and says so
BUDGET=${BUDGET:-$([ -n "$SMALL" ] && echo 2400 || echo 570)}
END=$(( $(date +%s) + BUDGET ))
SCALE=$([ -n "$SMALL" ] && echo 3 || echo 1)  # the CPU rehearsal is slower than any GPU

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to OUT/NAME.log
  local name=$1 limit=$(( $2 * SCALE )) start rc left
  shift 2
  left=$(( END - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped: the budget of ${BUDGET}s is spent" | tee -a "$OUT/steps.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit}s)"
  start=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
  tail -3 "$OUT/$name.log"
}

step env 30 bash -c "nvidia-smi || echo 'no nvidia-smi'; $PY -c '
import torch, onnxruntime, platform
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"available\", torch.cuda.is_available(), \"onnxruntime\", onnxruntime.__version__,
      onnxruntime.get_available_providers())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), \"bf16\", torch.cuda.is_bf16_supported(including_emulation=False))'"

# the device-aware tests (parametrised by device: CPU always, CUDA where present), then the rest of the
# suite's CUDA-sensitive files; warnings from deterministic-algorithm checks are kept in the log
step tests-devices 180 $PY -m pytest -p no:cacheprovider -q -rw tests/test_devices.py tests/test_export.py

# bench: full on CUDA (whole epochs, CUDA graphs, ORT with IO binding where onnxruntime-gpu is present)
if [ -n "$SMALL" ]; then
  step bench 80 $PY bench.py --device cpu --model gap10k --steps 3 --repeats 1 --calls 5 --variant eager amp \
    --backend eager onnxruntime pt2 --json "$OUT/bench.json"
else
  step bench 150 $PY bench.py --device cuda --backend eager torchscript compile onnxruntime pt2 \
    --json "$OUT/bench.json"
  # AOTInductor compiles one package per model (about a minute): gap10k only, beside eager and ORT
  step bench-aoti 150 $PY bench.py --device cuda --model gap10k --task infer --backend eager onnxruntime aoti \
    --json "$OUT/bench-aoti.json"
fi

# one full gap10k run on the device: the "< 1 s per epoch" target, then export parity from a CUDA checkpoint
if [ -n "$SMALL" ]; then EP="--epochs 1 --subset 2048"; else EP=""; fi
step train-gap10k 60 $PY train.py --model gap10k --device $DEV --no-progress --out "$OUT/gap10k" $EP
step train-gap10k-fast 60 $PY train.py --model gap10k --device $DEV --no-progress --out "$OUT/gap10k-fast" \
  --amp --compile $EP
# --format all: ONNX, TorchScript, .pt2 and an AOTInductor package compiled for the device (a minute)
step export 150 $PY export.py --checkpoint "$OUT/gap10k/best.pt" --format all --out "$OUT/exports"

# as time allows: one seed of every recipe (reproduce.py skips finished runs, so a rerun goes on)
if [ -n "$SMALL" ]; then
  step reproduce 20 $PY -c "print('skipped on the CPU rehearsal: it trains every recipe in full')"
else
  step reproduce 150 $PY reproduce.py --seeds 1 --device cuda
  cp REPRODUCTION.md "$OUT/REPRODUCTION.md" 2>/dev/null
fi
echo "results in $OUT/"
