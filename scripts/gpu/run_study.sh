#!/usr/bin/env bash
# LSQ against LSQ+BR at the reference package's full budget on one GPU, then the benchmark:
# one command for a lent GPU machine (docs/guides/gpu_run.md says how to call it).
#
#     bash scripts/gpu/prepare.sh          # here first: wheels, data, commit (carried)
#     bash scripts/gpu/run_study.sh        # there: about 9 minutes at most
#     bash scripts/gpu/run_study.sh --tiny # a rehearsal of the same path on a CPU
#     bash scripts/gpu/run_study.sh --dry_run [--tiny]  # only the study's plan (no JAX)
#
# What it runs: the comparison study of scripts/experiments.py with configs lsq and lsq_br,
# W2A2 ResNet-20 on CIFAR-10 from the float model $FLOAT, the reference package's recipe
# (--recipe=reference: Adam 0.01, L2 1e-4, batch 128) and budget (30 LSQ warmup epochs + 70
# BR epochs, the whole training and test sets), seed 0. The two runs share the warmup and
# run at the same time on the one GPU: the study trains warmup_s0 and then lsq_s0
# (--runs=lsq_s0); as soon as the warmup is done, a copy of the study folder holding it
# runs lsq_br_s0 (--runs=lsq_br_s0), as docs/guides/experiments.md describes for one
# machine's share; its result is gathered into the study and --summarize_only writes the
# summary. Then scripts/benchmark.py (without its ONNX part) with the time left.
#
# Time: the whole script keeps to $BUDGET_S seconds (default 570; the device call's limit
# is 600). Training stops at BUDGET_S - BENCH_MIN_S - 20 if it has not finished (SIGTERM:
# each run saves where it stopped, and running this again on the same machine resumes it);
# the benchmark gets what is left and is stopped at the budget (its JSON lines so far are
# kept). Everything it writes goes to $OUT (the device tool's folder; default .gpu_out/):
#
#   run.log             this script's output: devices, versions, plan, progress, tables
#   summary.md          the study's summary table
#   results.tar.gz      the study folders without checkpoints: study.json, summary,
#                       curves.png, result JSONs, each run's metrics.jsonl and train.log,
#                       the two studies' streamed output
#   benchmark.txt       the benchmark's table (or, if it was stopped, the measurements taken)
#   benchmark.jsonl     one JSON line per measurement
#   ckpt_<run>.tar      each run's checkpoints/ (best, latest), for evaluate.py or a resume
#
# Environment: FLOAT (default checkpoints/resnet20_float_cifar10), BUDGET_S, BENCH_MIN_S
# (default 90), STUDY_DIR (default checkpoints/study_gpu_W2A2_100ep), PYTHON (python3),
# OUT. --tiny (or TINY=1): 512 training and 256 test images, 1 warmup + 2 BR epochs, the
# benchmark's --quick, a budget of 1800 s and study_dir checkpoints/study_gpu_tiny (made
# afresh): the same commands on a CPU in a few minutes.
set -u
start_s=$(date +%s)
elapsed() { echo $(($(date +%s) - start_s)); }
say() { echo "[run_study $(printf '%4d' "$(elapsed)")s] $*"; }

TINY=${TINY:-0}
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    --dry_run) DRY_RUN=1 ;;
    *) echo "error: unknown argument $arg (use --tiny, --dry_run or none)" >&2; exit 2 ;;
  esac
done
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
FLOAT=${FLOAT:-checkpoints/resnet20_float_cifar10}
BENCH_MIN_S=${BENCH_MIN_S:-90}
if [ "$TINY" = 1 ]; then
  BUDGET_S=${BUDGET_S:-1800}
  S=${STUDY_DIR:-checkpoints/study_gpu_tiny}
  SIZE=(--warmup_epochs=1 --epochs=3 --train_examples=512 --test_examples=256)
  BENCH=(--quick)
else
  BUDGET_S=${BUDGET_S:-570}
  S=${STUDY_DIR:-checkpoints/study_gpu_W2A2_100ep}
  SIZE=(--warmup_epochs=30 --epochs=100)
  BENCH=(--noonnx)
fi
SB=${S}_lsq_br  # the copy that runs lsq_br_s0 beside the study
# ---------------------------------------------------------------- the study's flags
DATA=../shared/datasets/cifar10-jpeg.tar.gz  # the path the CPU studies record
if [ ! -f "$DATA" ] && [ "$DRY_RUN" = 0 ]; then
  if [ ! -f .gpu_data/cifar10-jpeg.tar.gz ]; then
    echo "error: no $DATA and no .gpu_data/cifar10-jpeg.tar.gz (scripts/gpu/prepare.sh)" >&2
    exit 1
  fi
  mkdir -p ../shared/datasets 2>/dev/null &&
    ln -sf "$REPO/.gpu_data/cifar10-jpeg.tar.gz" "$DATA" 2>/dev/null ||
    DATA=.gpu_data/cifar10-jpeg.tar.gz
fi
if [ ! -f "$FLOAT/metrics.jsonl" ]; then
  echo "error: FLOAT=$FLOAT holds no float run (carry it if git ignores it)" >&2
  exit 1
fi
FLAGS=(--pretrained="$FLOAT" --data_dir="$DATA" --bits=2 --seeds=0 --configs=lsq,lsq_br
       --recipe=reference --lr=0.01 --batch_size=128 "${SIZE[@]}")
if [ "$DRY_RUN" = 1 ]; then
  echo "study: scripts/experiments.py --study_dir=$S ${FLAGS[*]}"
  exec "$PY" scripts/experiments.py --study_dir="$S" "${FLAGS[@]}" --dry_run
fi
[ "$TINY" = 1 ] && rm -rf "$S" "$SB"

if [ -z "${OUT:-}" ]; then
  OUT=$REPO/.gpu_out
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

# ---------------------------------------------------------------- packages, devices
if ! "$PY" -c "import grain, tensorboardX" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    say "error: grain or tensorboardX is missing and no .whl/ was carried (scripts/gpu/prepare.sh)"
    exit 1
  fi
  say "installing the carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { say "error: the wheels did not install"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
say "host $(hostname), $(nproc) CPUs; code: $(tr '\n' ' ' <.gpu_data/commit.txt 2>/dev/null ||
  echo 'unknown (no .gpu_data/commit.txt)')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | sed 's/^/  GPU: /'
"$PY" - >"$OUT/.probe" <<'EOF' || { say "error: JAX or brjax does not import"; exit 1; }
import importlib.metadata as md, platform, jax
d = jax.devices()
print(f"  JAX devices: {len(d)} x {d[0].device_kind} ({d[0].platform}); python "
      f"{platform.python_version()}")
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "grain",
         "tensorboardX", "qwix")
def version(n):
  try:
    return md.version(n)
  except md.PackageNotFoundError:
    return "missing"
print("  versions: " + ", ".join(f"{n} {version(n)}" for n in names))
import brjax.training.train  # noqa: F401  (every import a run needs)
EOF
cat "$OUT/.probe"
device=$(sed -n 's/^  JAX devices: \([^;]*\);.*/\1/p' "$OUT/.probe")
rm -f "$OUT/.probe"
say "study: scripts/experiments.py --study_dir=$S ${FLAGS[*]}"
"$PY" scripts/experiments.py --study_dir="$S" "${FLAGS[@]}" --dry_run | sed 's/^/  /'

# ---------------------------------------------------------------- training
# Two runs on one GPU: JAX must not take 75% of its memory per process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
train_end=$((BUDGET_S - BENCH_MIN_S - 20))
mkdir -p "$S"
say "lsq_s0 (after warmup_s0) starts; training stops at ${train_end}s at the latest"
"$PY" scripts/experiments.py --study_dir="$S" "${FLAGS[@]}" --runs=lsq_s0 \
  >"$S/experiments_lsq.log" 2>&1 &
pid_a=$!
pid_b=""
warmup_done() {
  "$PY" - "$S/warmup_s0" "${SIZE[0]#--warmup_epochs=}" <<'EOF'
import sys
from brjax.training import history
epochs = history.checkpoint_epochs(sys.argv[1], "latest")
sys.exit(0 if epochs and epochs[-1] >= int(sys.argv[2]) else 1)
EOF
}
stopped=0
while :; do
  a_alive=0; b_alive=0
  kill -0 "$pid_a" 2>/dev/null && a_alive=1
  [ -n "$pid_b" ] && kill -0 "$pid_b" 2>/dev/null && b_alive=1
  # lsq_s0's folder appears once its warmup has ended (the warmup process has exited).
  if [ -z "$pid_b" ] && [ -d "$S/lsq_s0" ] && warmup_done; then
    say "warmup_s0 done: lsq_br_s0 starts beside lsq_s0, in a copy of the study ($SB)"
    mkdir -p "$SB"
    [ -f "$SB/study.json" ] || cp "$S/study.json" "$SB/"
    [ -d "$SB/warmup_s0" ] || cp -a "$S/warmup_s0" "$SB/"
    "$PY" scripts/experiments.py --study_dir="$SB" "${FLAGS[@]}" --runs=lsq_br_s0 \
      >"$SB/experiments_lsq_br.log" 2>&1 &
    pid_b=$!
    b_alive=1
  fi
  if [ "$a_alive" = 0 ] && { [ "$b_alive" = 0 ] || [ -z "$pid_b" ]; }; then
    break
  fi
  if [ "$(elapsed)" -ge "$train_end" ]; then
    say "time: stopping the training (SIGTERM; each run saves where it stopped)"
    stopped=1
    for pid in $pid_a $pid_b; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 60); do
      kill -0 "$pid_a" 2>/dev/null || { [ -n "$pid_b" ] && kill -0 "$pid_b" 2>/dev/null; } ||
        break
      sleep 1
    done
    for pid in $pid_a $pid_b; do kill -KILL "$pid" 2>/dev/null; done
    break
  fi
  sleep 2
done
wait "$pid_a"; code_a=$?
code_b=none
[ -n "$pid_b" ] && { wait "$pid_b"; code_b=$?; }
say "training ended: study exit $code_a (lsq_s0), copy exit $code_b (lsq_br_s0)$(
  [ "$stopped" = 1 ] && echo ', stopped at the time limit')"
for log in "$S/experiments_lsq.log" "$SB/experiments_lsq_br.log"; do
  [ -f "$log" ] || continue
  echo "  --- $log: the epochs' lines and the runner's, the last 8"
  tr '\r' '\n' <"$log" | grep -E -e '^Epoch [0-9]+/[0-9]+ \[' -e '^\[[0-9]+/[0-9]+\]' \
    -e '^(error|interrupted|Traceback)' | tail -8 | sed 's/^/  /'
done
[ -f "$SB/lsq_br_s0.json" ] && cp "$SB/lsq_br_s0.json" "$S/"
unset XLA_PYTHON_CLIENT_PREALLOCATE
if ls "$S"/*_s0.json >/dev/null 2>&1; then
  "$PY" scripts/experiments.py --study_dir="$S" --summarize_only >/dev/null &&
    cp "$S/summary.md" "$OUT/summary.md" && { echo; cat "$S/summary.md"; echo; }
else
  say "no run finished: no summary (each run's metrics.jsonl is in results.tar.gz)"
fi

# ---------------------------------------------------------------- results
pack() {
  local parent name
  parent=$(dirname "$S")
  name=$(basename "$S")
  tar czf "$OUT/results.tar.gz" -C "$parent" --exclude='*/checkpoints' \
    --exclude='*/tensorboard' --exclude=.lock \
    "$name" "$(basename "$SB")" 2>/dev/null
  for run in warmup_s0 lsq_s0; do
    [ -d "$S/$run/checkpoints" ] && tar cf "$OUT/ckpt_$run.tar" -C "$parent" "$name/$run/checkpoints"
  done
  [ -d "$SB/lsq_br_s0/checkpoints" ] &&
    tar cf "$OUT/ckpt_lsq_br_s0.tar" -C "$parent" "$(basename "$SB")/lsq_br_s0/checkpoints"
  local big
  big=$(find "$OUT" -maxdepth 1 -name 'ckpt_*.tar' -size +15M)
  [ -n "$big" ] && say "warning: over 15 MiB, may not come back: $big"
}
pack
say "results packed: $(cd "$OUT" && ls | tr '\n' ' ')"

# ---------------------------------------------------------------- benchmark
bench_s=$((BUDGET_S - $(elapsed) - 10))
if [ "$bench_s" -lt 30 ]; then
  say "benchmark: skipped, ${bench_s}s left"
else
  say "benchmark: scripts/benchmark.py ${BENCH[*]} (at most ${bench_s}s)"
  timeout -s TERM "$bench_s" "$PY" scripts/benchmark.py "${BENCH[@]}" \
    --json_out="$OUT/benchmark.jsonl" >"$OUT/benchmark.txt"
  code=$?
  if [ "$code" = 124 ]; then
    say "benchmark: stopped at the time limit; the measurements taken:"
    "$PY" - "$OUT/benchmark.jsonl" >"$OUT/benchmark.txt" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("benchmark stopped at the time limit; the measurements it had taken"
      + (f" ({rows[0]['context']}):" if rows else ": none"))
for m in rows:
  value = f"{m['value']:12.4g}" if isinstance(m["value"], float) else f"{m['value']!s:>12s}"
  print(f"{m['name']:36s}  {value}  {m['unit']}")
EOF
  fi
  cat "$OUT/benchmark.txt"
fi

# ---------------------------------------------------------------- what ran where
echo
say "done. What ran where:"
echo "  device: $device, host $(hostname); code $(head -1 .gpu_data/commit.txt 2>/dev/null)"
for f in "$S"/lsq_s0.json "$SB"/lsq_br_s0.json; do
  "$PY" - "$f" <<'EOF'
import json, os, statistics, sys
path = sys.argv[1]
name, metrics = os.path.basename(path)[:-5], os.path.join(path[:-5], "metrics.jsonl")
rows = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
speed = ", ".join(
    f"{phase} epochs: median {statistics.median(m['epoch_time_s'] for m in ms):.1f}s, step "
    f"{1e3 * statistics.median(m['step_time_s'] or 0 for m in ms):.1f} ms"
    for phase in ("WARMUP", "BR") if (ms := [m for m in rows if m.get("phase") == phase]))
if not os.path.exists(path):
  last = (f"its last logged epoch {rows[-1]['epoch']}: test acc {rows[-1]['test_acc']:.2f}%"
          if rows else "no epoch logged")
  print(f"  {name}: no result (stopped or failed); {last}; {speed or 'no epoch time'}")
  sys.exit()
r = json.load(open(path))
acc = (f"final test acc {r['final_test_acc']:.2f}%, best {r['best_test_acc']:.2f}%"
       if r["final_test_acc"] is not None else f"diverged: {r['diverged']}")
print(f"  {name}: {acc}; {r['epochs']} epochs ({r['warmup_epochs']} warmup) on "
      f"{r['device'].get('device_count')} x {r['device'].get('device_kind')} "
      f"({r['device'].get('platform')}), {r['wall_time_s']:.0f}s after the warmup; {speed}")
EOF
done
echo "  benchmark: benchmark.txt / benchmark.jsonl, same device"
echo "  files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
