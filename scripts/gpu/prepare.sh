#!/usr/bin/env bash
# Prepares what scripts/gpu/run_study.sh needs on a GPU machine that reaches no network.
# Run here, from any folder, on a machine that reaches the package registry:
#
#     bash scripts/gpu/prepare.sh
#
# It fills two folders of the repository that git ignores (.git/info/exclude; never commit
# them) and that the device call carries:
#
#   .whl/       the Python packages brjax needs that the GPU image lacks (grain and its
#               array_record and portpicker, tensorboardX, and qwix for the benchmark's
#               comparison), as wheels for CPython 3.12 on manylinux x86-64, the image's
#               Python; the versions are the ones brjax is tested with here
#   .gpu_data/  cifar10-jpeg.tar.gz (the offline CIFAR-10, checked against its sha256) and
#               commit.txt (the commit and whether the tree differs from it: the device copy
#               has no .git)
#
# Environment: DATA_SRC (default ../shared/datasets/cifar10-jpeg.tar.gz), FLOAT (the float
# model run_study.sh starts from, default checkpoints/resnet20_float_cifar10: it travels with
# the tree if git tracks all of it; if git ignores any of its files, this script says to name
# it in carry).
# Idempotent: wheels and data already there are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA_SRC=${DATA_SRC:-../shared/datasets/cifar10-jpeg.tar.gz}
DATA_SHA256=d34c68f61cca57aa9144c8f25bda427abb9921bd642d5857a2fc1a6b4416f965
FLOAT=${FLOAT:-checkpoints/resnet20_float_cifar10}
# name==version: the versions this project's venv runs; their own needs are on the image
# (absl-py, cloudpickle, etils, numpy, protobuf, psutil, packaging, flax, jax, opt-einsum).
WHEELS=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5 qwix==0.1.8)

exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
for line in /.whl/ /.gpu_data/ /.gpu_out/; do
  grep -qxF "$line" "$exclude" 2>/dev/null || echo "$line" >>"$exclude"
done

mkdir -p .whl .gpu_data
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  version=${spec##*==}
  # pip saves a wheel under its normalized name (tensorboardx-2.6.5-...): match any case.
  if ls .whl | grep -qi "^$(echo "$name" | tr '-' '_')-${version}-.*\.whl$"; then
    continue
  fi
  # PIP_CONSTRAINT="": the machine's pip constraints pin this venv, not the device's.
  PIP_CONSTRAINT="" python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$spec" 2>&1 | { grep -v "^WARNING: Location" || true; }
done
echo "wheels in .whl/:"
ls -l .whl/*.whl | awk '{print "  " $NF " (" $5 " bytes)"}'
if [ "$(ls .whl/*.whl | wc -l)" -ne "${#WHEELS[@]}" ]; then
  echo "error: .whl/ holds other wheels than the ${#WHEELS[@]} listed here (two versions of" \
       "one stop the install there): remove the others" >&2
  exit 1
fi

if [ ! -f .gpu_data/cifar10-jpeg.tar.gz ] ||
   ! echo "$DATA_SHA256  .gpu_data/cifar10-jpeg.tar.gz" | sha256sum -c --quiet - 2>/dev/null; then
  cp "$DATA_SRC" .gpu_data/cifar10-jpeg.tar.gz
  echo "$DATA_SHA256  .gpu_data/cifar10-jpeg.tar.gz" | sha256sum -c --quiet -
fi
echo "data: .gpu_data/cifar10-jpeg.tar.gz ($(stat -c %s .gpu_data/cifar10-jpeg.tar.gz)" \
     "bytes, sha256 ok)"

commit=$(git rev-parse HEAD)
if git diff --quiet HEAD -- . ':(exclude)checkpoints'; then dirty=false; else dirty=true; fi
printf 'commit %s\ndirty %s\nprepared %s\n' "$commit" "$dirty" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >.gpu_data/commit.txt
echo "code: $(tr '\n' ' ' <.gpu_data/commit.txt)"

carry='[".whl", ".gpu_data"]'
if [ ! -d "$FLOAT" ]; then
  echo "error: FLOAT=$FLOAT is not a folder" >&2
  exit 1
fi
# Only tracked and untracked-not-ignored files travel: a float model with any file git ignores
# (a run force-added in part, its newer checkpoints ignored) must be carried whole.
ignored=$(git ls-files --others --ignored --exclude-standard -- "$FLOAT" | head -1)
if [ -n "$ignored" ]; then
  carry="[\".whl\", \".gpu_data\", \"$FLOAT\"]"
  echo "float model: $FLOAT holds files git ignores ($ignored, ...): name it in carry" \
       "($(du -sh "$FLOAT" | cut -f1))"
else
  echo "float model: every file of $FLOAT is in git: it travels with the tree"
fi
tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } |
  { xargs -0 stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s}')
carried_bytes=$(du -sb .whl .gpu_data | awk '{s += $1} END {print s}')
echo "what travels: tree $((tree_bytes / 1048576)) MiB + carried $((carried_bytes / 1048576)) MiB" \
     "(limit 64 MiB; a carried float model adds its size)"
echo "carry: $carry"
