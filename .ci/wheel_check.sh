#!/usr/bin/env bash
# The package as users get it: build the sdist and the wheel (`python -m build`), install the wheel
# into a fresh virtualenv outside the checkout, and use it from an empty folder: every recipe by
# name, a one-epoch tiny training with `--hn-config recommended`, the SLURM launcher, the OpenCLIP
# patch, the negatives CLI, eval, and the demo at toy size. Run by .ci/run after the tests; alone: `bash .ci/wheel_check.sh` (~5 min).
#
# The virtualenv has --system-site-packages and the wheel goes in with --no-deps: a brand-new
# environment would copy torch (~5 GB) on every CI run. What runs is still the wheel, not the
# checkout: the checks below fail unless open_clip_hn, its recipes and its model configs are
# imported from the venv, PYTHONPATH is unset and the working folder is empty.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/open_clip_hn-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH
step() { echo "[wheel-check] $*"; }

step "building sdist and wheel"
if ! "$PYTHON" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log"; exit 1
fi
WHEEL=$(ls "$WORK"/dist/open_clip_hn-*.whl)
SDIST=$(ls "$WORK"/dist/open_clip_hn-*.tar.gz)

step "package data: every file of open_clip_hn/, configs/, slurm/ and patches/ is in the wheel and the sdist"
"$PYTHON" - "$REPO" "$WHEEL" "$SDIST" <<'EOF'
import os, sys, tarfile, zipfile
repo, wheel, sdist = sys.argv[1:]
def files(top):
    for root, dirs, names in os.walk(os.path.join(repo, top)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        yield from (os.path.relpath(os.path.join(root, n), repo) for n in names if not n.endswith(".pyc"))
source = sorted([*files("open_clip_hn"), *files("configs"), *files("slurm"), *files("patches")])
in_wheel = set(zipfile.ZipFile(wheel).namelist())
# configs/ and slurm/ are installed as the packages open_clip_hn.configs and open_clip_hn.slurm
# (pyproject's package-dir mapping)
mapped = ("configs/", "slurm/", "patches/")
missing = [f for f in source if (f"open_clip_hn/{f}" if f.startswith(mapped) else f) not in in_wheel]
prefix = os.path.basename(sdist)[: -len(".tar.gz")]
in_sdist = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
missing += [f"(sdist) {f}" for f in source if f not in in_sdist]
kinds = {"model configs": "open_clip_hn/model_configs/", "lexicons": "open_clip_hn/negatives/data/",
         "recipes": "configs/", "SLURM launchers": "slurm/", "OpenCLIP patch": "patches/"}
for kind, folder in kinds.items():
    if not any(f.startswith(folder) for f in source):
        sys.exit(f"no {kind} under {folder} in the checkout")
if missing:
    sys.exit("missing from the built package: " + ", ".join(missing))
print(f"  {len(source)} files in both, including " + ", ".join(
    f"{sum(f.startswith(d) and not f.endswith('.py') for f in source)} {k}" for k, d in kinds.items()))
EOF

step "installing the wheel into a fresh virtualenv"
"$PYTHON" -m venv --system-site-packages "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --no-deps "$WHEEL"
mkdir "$WORK/empty"
cd "$WORK/empty"

step "the wheel runs, not the checkout"
"$PY" - "$WORK/venv" "$REPO" <<'EOF'
import os, sys
venv, repo = (os.path.realpath(p) for p in sys.argv[1:])
import open_clip_hn, open_clip_hn.demo as demo
import open_clip_hn.negatives.cli, open_clip_hn.slurm.submit
from open_clip_hn.recipes import resolve_recipe
# every subpackage too: in a --system-site-packages venv an editable install of the checkout can
# still serve a subpackage the wheel lacks
for what, path in [("open_clip_hn", open_clip_hn.__file__), ("recipe negclip", resolve_recipe("negclip")),
                   ("demo model config", demo.MODEL_CONFIG),
                   ("open_clip_hn.negatives", open_clip_hn.negatives.cli.__file__),
                   ("open_clip_hn.slurm", open_clip_hn.slurm.submit.__file__)]:
    path = os.path.realpath(path)
    if not path.startswith(venv + os.sep) or path.startswith(repo + os.sep):
        sys.exit(f"{what} comes from {path}, not from the wheel in {venv}")
    print(f"  {what}: {path}")
EOF
PKG=$("$PY" -c "import open_clip_hn, os; print(os.path.dirname(open_clip_hn.__file__))")

step "every recipe by name (--hn-list-configs, --hn-print-config)"
NAMES=$("$PY" -m open_clip_hn.train --hn-list-configs | tail -n +2 | awk '{print $1}')
SHIPPED=$(cd "$REPO/configs" && ls *.yaml | sed 's/\.yaml$//' | LC_ALL=C sort)
[ "$(echo $NAMES)" = "$(echo $SHIPPED)" ] || {
  echo "the wheel lists recipes [$(echo $NAMES)]; the checkout's configs/ has [$(echo $SHIPPED)]"; exit 1; }
for name in $NAMES; do
  # a ViT: the model the recipes were written for (fsc-clip's local term refuses a ResNet)
  "$PY" -m open_clip_hn.train --model ViT-B-32 --hn-config "$name" --hn-print-config >"$name.yaml"
  # the header names the file read: the wheel's own copy of the recipe
  grep -q "^# resolved configuration (recipe $name: $PKG/configs/$name.yaml + command line)" "$name.yaml" || {
    head -1 "$name.yaml"; exit 1; }
done

step "one-epoch tiny training with --hn-config recommended"
SHARDS=$("$PY" -c "from open_clip_hn.scenes import shards_spec, write_scene_shards
print(shards_spec(write_scene_shards('shards', num_samples=256, samples_per_shard=128, seed=0)))")
# 256 captions in the shards: enough for the recipe's plausibility model (at least 200); 32 trained
"$PY" -m open_clip_hn.train --hn-config recommended --hn-curriculum-warmup 0 \
  --train-data "$SHARDS" --dataset-type webdataset --train-num-samples 32 --batch-size 8 \
  --epochs 1 --workers 1 --precision fp32 --model hn-tiny-vit \
  --model-config "$PKG/model_configs/hn-tiny-vit.json" --lr 1e-3 --warmup 1 --seed 0 \
  --logs logs --name recommended --report-to none >train.out 2>&1 || { tail -40 train.out; exit 1; }
CKPT=logs/recommended/checkpoints/epoch_1.pt
test -f "$CKPT" && test -f "$CKPT.hn" && grep -q '"model": "hn-tiny-vit"' "$CKPT.json"
grep -q "Negatives are kept only where they read about as plausibly" train.out  # the recipe's filter

step "the SLURM launcher from the wheel (python -m open_clip_hn.slurm.submit --local)"
"$PY" -m open_clip_hn.slurm.submit --help | head -1 | grep -q "python -m open_clip_hn.slurm.submit"
test -f "$("$PY" -c "import open_clip_hn.slurm as s; print(s.__path__[0])")/train.sbatch"
"$PY" -m open_clip_hn.slurm.submit --local --gpus-per-node 0 --tasks-per-node 1 --cpus-per-task 1 \
  --time 10 --job-dir "$WORK/empty/job" -- --hn-negatives online --hn-loss clip,choice \
  --hn-vocabulary none --train-data "$SHARDS" --dataset-type webdataset --train-num-samples 16 \
  --batch-size 8 --epochs 1 --workers 0 --precision fp32 --model hn-tiny-vit \
  --model-config "$PKG/model_configs/hn-tiny-vit.json" --report-to none >submit.out 2>&1 \
  || { tail -40 submit.out; cat job/*_log.err 2>/dev/null | tail -40; exit 1; }
test -f job/train/checkpoints/epoch_1.pt.hn

step "the OpenCLIP patch from the wheel, as patches/README.md applies it (to a copy of open_clip_train)"
P=$("$PY" -c "import importlib.resources as r; print(r.files('open_clip_hn.patches') / 'open_clip_train-plugins.patch')")
mkdir oct && cp -r "$("$PY" -c 'import open_clip_train, os; print(os.path.dirname(open_clip_train.__file__))')" oct/
patch -p1 -N -d oct --dry-run < "$P" >/dev/null && patch -p1 -N -d oct < "$P" >/dev/null
PYTHONPATH=oct "$PY" -m open_clip_train.main --plugins open_clip_hn --help | grep -q -- "--hn-negatives"

step "negatives CLI and eval"
"$PY" -m open_clip_hn.negatives show "a red cube to the left of a blue ball" >show.out
head -3 show.out
grep -q "swap_attributes" show.out
"$PY" -m open_clip_hn.eval --help >/dev/null
"$PY" -c "from open_clip_hn.scenes import write_compositional_sets
write_compositional_sets('sets', num_items=8, num_pairs=4, num_retrieval=8)"
"$PY" -m open_clip_hn.eval --model hn-tiny-vit --model-config "$PKG/model_configs/hn-tiny-vit.json" \
  --pretrained "$CKPT" --compositional sets --retrieval sets/retrieval --format clip_benchmark \
  --output cb >eval.out 2>&1 || { tail -20 eval.out; exit 1; }
ls cb | grep -q "_image_caption_selection.json"

step "the demo at toy size"
"$PY" -m open_clip_hn.demo --output-dir demo --samples 64 --test-items 4 --pretrain-epochs 1 \
  --pretrain-batch-size 16 --epochs 1 --batch-size 16 --hn-args "--hn-curriculum-warmup 0 --hn-plausibility none" \
  >demo.out 2>&1 || { tail -40 demo.out; exit 1; }
test -f demo/results.json && test -f demo/compare.png
step "ok"
