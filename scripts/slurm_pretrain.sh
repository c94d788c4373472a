#!/usr/bin/env bash
# Multi-node MAE pretraining under SLURM: one torchrun per node, c10d rendezvous on the first node.
#   sbatch scripts/slurm_pretrain.sh configs/mae_vit_large_in1k.yaml data.path=/data/imagenet/train distributed.strategy=fsdp
# Check the whole setup first with one step and one checkpoint save on every rank:
#   sbatch scripts/slurm_pretrain.sh configs/mae_vit_large_in1k.yaml --dry-run
#SBATCH --job-name=mimkit
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# A requeued job resumes from the newest checkpoint in train.out_dir (train.resume: auto, the default).
srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "${SLURM_GPUS_PER_NODE:-8}" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" \
  -m mimkit.cli pretrain "$@"
