#!/usr/bin/env bash
# Multi-node pretraining under SLURM that survives preemption and the time limit: one task per GPU started by
# srun (mimkit reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), requeued until the run is finished.
#   sbatch scripts/slurm_pretrain.sh configs/mae_vit_large_in1k.yaml data.path=/data/imagenet/train distributed.strategy=fsdp
# Check the whole setup first with one step and one checkpoint save on every rank:
#   sbatch scripts/slurm_pretrain.sh configs/mae_vit_large_in1k.yaml --dry-run
#
# How it stops and comes back:
# - 120 s before the time limit SLURM sends SIGUSR1 to every task (--signal=USR1@120; mimkit's train.stop_signal).
#   Preemption and scancel send SIGTERM (after GraceTime / KillWait). Either way every rank finishes its optimizer
#   step, the run writes a checkpoint (sharded under FSDP) and each task exits with 75.
# - Exit status 75 means "stopped, resumable": this script requeues the job, which resumes from that checkpoint
#   (train.resume: auto) bit-identically. 0 is finished; 2 is a problem with the input (one line in the log, not
#   requeued); anything else is a failure (not requeued).
#SBATCH --job-name=mimkit
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

srun --kill-on-bad-exit=0 python -m mimkit.cli pretrain "$@"
status=$?
if [ "$status" -eq 75 ]; then
  echo "mimkit stopped with a checkpoint (exit 75): requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
