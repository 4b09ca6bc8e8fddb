#!/bin/bash
# The accuracy targets: Fashion-MNIST (40 labels, EfficientNet-Lite0 pseudo-labels)
# and WordNet nouns (32 labels, MiniLM pseudo-labels); zeromatch vs its baselines with the
# step budgets of docs/measured.md. Prints one test-accuracy line per run at the end.
#
#   bash benchmarks/train_targets.sh [WORK_DIR] [DEVICE]      # defaults: benchmarks/work cpu
#
# On 2 CPU cores each image run takes ~5 min and each text run ~5-10 min; with a GPU
# (DEVICE=cuda) an image run takes about a minute.
set -euo pipefail
W=${1:-benchmarks/work}
DEV=${2:-cpu}
mkdir -p "$W/runs" "$W/labels"

python examples/build_datasets.py --out "$W/data" --labels-per-class 4 --max-unlabeled 10000 \
  --max-test 2000 --seed 0
I=$W/data/images
T=$W/data/text
zmdevice label "$I/unlabeled" --classes "$I/classes.toml" --teacher efficientnet-lite0 \
  --out "$W/labels/images.parquet" --device "$DEV" --gold "$I/unlabeled_gold.csv"
zmdevice label "$I/test" --classes "$I/classes.toml" --teacher efficientnet-lite0 \
  --out "$W/labels/images-test.parquet" --device "$DEV" --gold "$I/test"
zmdevice label "$T/unlabeled.csv" --classes "$T/classes.toml" --teacher minilm \
  --out "$W/labels/text.parquet" --device "$DEV" --gold "$T/unlabeled_gold.csv"
zmdevice label "$T/test.csv" --classes "$T/classes.toml" --teacher minilm \
  --out "$W/labels/text-test.parquet" --device "$DEV" --gold "$T/test.csv"

# gold_unlabeled only feeds the "pseudo-label accuracy above threshold" diagnostic.
printf 'eval_every = 100\ngold_unlabeled = "%s"\n' "$I/unlabeled_gold.csv" > "$W/images.toml"
printf 'eval_every = 50\ngold_unlabeled = "%s"\n' "$T/unlabeled_gold.csv" > "$W/text.toml"

image() { # name, then train flags
  local name=$1; shift
  zmdevice train --labeled "$I/labeled" --unlabeled "$I/unlabeled" --test "$I/test" \
    --student mobilenet_v3_small --device "$DEV" --config "$W/images.toml" \
    --out "$W/runs/images-$name" --json "$@" > "$W/runs/images-$name.json"
}
text() {
  local name=$1; shift
  zmdevice train --labeled "$T/labeled.csv" --unlabeled "$T/unlabeled.csv" --test "$T/test.csv" \
    --student distilbert --device "$DEV" --config "$W/text.toml" \
    --out "$W/runs/text-$name" --json "$@" > "$W/runs/text-$name.json"
}
IP="--pseudo-labels $W/labels/images.parquet"
TP="--pseudo-labels $W/labels/text.parquet"
image zeromatch $IP --kd-steps 500 --ssl-steps 500
image kd $IP --method kd --kd-steps 500
image supervised --method supervised --ssl-steps 1000
image fixmatch --method fixmatch --ssl-steps 1000
image adamatch --method adamatch --ssl-steps 1000
text zeromatch $TP --kd-steps 150 --ssl-steps 150
text supervised --method supervised --ssl-steps 300
text fixmatch --method fixmatch --ssl-steps 300

python - "$W/runs" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    summary = json.loads(path.read_text())
    print(f"{path.stem:24s} test accuracy {100 * summary['test_accuracy']:.1f}%  "
          f"macro-F1 {100 * summary['test_macro_f1']:.1f}%  ({summary['seconds']:.0f} s)")
PY
