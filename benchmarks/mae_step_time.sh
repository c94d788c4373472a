#!/usr/bin/env bash
# MAE's training step on this machine with main.cmd's settings: 150 steps on one core (taskset -c ${CPU:-0}) into a
# scratch folder, then the median seconds per step of steps 11+ from its metrics.jsonl. Converts the study's
# core-minutes between CPUs (README, Results). Run from the repository root: bash benchmarks/mae_step_time.sh
# Arguments are more overrides, e.g. a one-block decoder: bash benchmarks/mae_step_time.sh mae.decoder_depth=1
set -euo pipefail
OUT=$(mktemp -d)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
taskset -c "${CPU:-0}" python -m mimkit.cli pretrain configs/mae_vit_tiny_cifar10.yaml data.path="${DATA:-../shared/data/cifar10.npz}" \
  data.format=npz data.num_workers=0 'data.mean=[0.4924, 0.4825, 0.4465]' 'data.std=[0.246, 0.2441, 0.2624]' \
  model.img_size=32 model.patch_size=4 train.epochs=3 train.schedule_steps=2343 optim.warmup_epochs=0.3 \
  train.precision=fp32 train.batch_size=64 optim.blr=3e-3 train.out_dir="$OUT" train.resume=none train.log_every=1 \
  train.progress=false train.tensorboard=false train.knn_every_epochs=0 train.vis_every_epochs=0 train.max_steps=150 \
  train.save_every_steps=null "$@" > "$OUT.log" 2>&1
python - "$OUT/metrics.jsonl" "$*" <<'PY'
import json, statistics, subprocess, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])][10:]
cpu = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name"))
print(f"{cpu}: MAE step{' with ' + sys.argv[2] if sys.argv[2] else ''} {statistics.median(gaps):.4f} s median, {statistics.mean(gaps):.4f} mean, steps 11-{len(rows)}")
PY
rm -rf "$OUT" "$OUT.log"
