#!/usr/bin/env bash
# A measured one-channel example (issue 35): MAE ViT-Tiny/4 pretrained on grayscale CIFAR-10 (model.in_chans 1,
# data.mean / data.std measured: auto), then k-NN of its checkpoint against a random-init encoder of the same
# architecture. Fashion-MNIST (configs/mae_vit_tiny_fashionmnist.yaml) is the recipe's dataset; its download hosts
# are not reachable from the machine this was measured on, so the grayscale CIFAR-10 stands in for it.
#   bash benchmarks/gray_cifar10.sh ../shared/data/cifar10.npz OUT_DIR [EPOCHS]
set -euo pipefail
src=${1:?cifar10.npz}; out=${2:?output folder}; epochs=${3:-2}
mkdir -p "$out"
python - "$src" "$out/gray.npz" <<'PY'
import sys, numpy as np
d = np.load(sys.argv[1])
gray = lambda x: np.round(x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)  # ITU-R 601 luma
np.savez(sys.argv[2], x_train=gray(d["x_train"]), y_train=d["y_train"], x_test=gray(d["x_test"]), y_test=d["y_test"])
PY
lscpu | grep -E "Model name|Flags" | sed 's/Flags:.*\(avx512_bf16\|amx_bf16\).*/Flags: (bf16 matmul: yes)/' | head -2
common=(model.arch=vit_tiny_patch4_32 model.in_chans=1 data.path="$out/gray.npz" data.mean=auto data.std=auto
        data.num_workers=1 train.precision=fp32 train.progress=false)
mimkit pretrain configs/mae_vit_tiny_cifar10.yaml "${common[@]}" train.epochs="$epochs" optim.warmup_epochs=0.25 \
    train.out_dir="$out/mae"
ckpt=$(ls -d "$out"/mae/checkpoint-* | sort | tail -1)
knn=(data.path="$out/gray.npz" data.val_split=test data.num_workers=1 train.precision=fp32 train.progress=false)
mimkit knn encoder.checkpoint="$ckpt" "${knn[@]}" train.out_dir="$out/knn_mae"
# the random-init baseline: the same one-channel model after one step at lr 1e-12 (its initial weights, in a checkpoint)
mimkit pretrain configs/mae_vit_tiny_cifar10.yaml "${common[@]}" train.max_steps=1 optim.lr=1e-12 optim.weight_decay=0 \
    train.out_dir="$out/init"
mimkit knn encoder.checkpoint="$(ls -d "$out"/init/checkpoint-* | tail -1)" "${knn[@]}" train.out_dir="$out/knn_random"
python - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("knn_mae", "knn_random"):
    p = out / name / "metrics.json"
    if p.is_file():
        m = json.loads(p.read_text())
        print(f"| {name} | top-1 {m['top1']:.2f} | top-5 {m['top5']:.2f} | {m['train_images']} train / {m['val_images']} val |")
PY
