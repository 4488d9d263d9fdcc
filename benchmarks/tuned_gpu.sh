#!/usr/bin/env bash
# Issue 29's fair protocol on one GPU (benchmarks/gpu_batch.py --part tuned; the report is benchmarks/tuned.py).
# Needs what `python benchmarks/prepare_carry.py --decoder_only` packs: both parts of .carry/models stashed by earlier
# calls or carried with this one, and .carry/run carried with every call. Run it in back-to-back calls while the
# machine stays warm: the wheels, the models and the results stay in /tmp, and each call goes on down the queue
# (--resume_from also merges the rows committed under benchmarks/results/, for a machine that was given back).
# Flags after the script go to gpu_batch.py (e.g. --budget_s 500 --jobs 12). Everything comes back in $OUT.
#
#   call 1, carry .carry/models/models.tar.part00 .carry/models/manifest.json:   python3 benchmarks/carry_models.py stash
#   call 2.., carry .carry/models/models.tar.part01 .carry/models/manifest.json .carry/run:  bash benchmarks/tuned_gpu.sh
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # many processes share the GPU's memory
if [ -d /tmp/site/transformers ]; then  # installed by an earlier call on this machine
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
else
  WHEELS=.carry/run/whl source benchmarks/device_setup.sh || exit 1
fi
[ -f /tmp/models/smollm2/config.json ] || python3 benchmarks/carry_models.py unpack --to /tmp/models || exit 1
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 20 >"${OUT:?}/smi.csv" 2>&1 &
smi=$!
python3 benchmarks/gpu_batch.py --part tuned --out "$OUT" --models /tmp/models --data .carry/run --gsm_steps 150 \
  --results_dir /tmp/tuned --resume_from benchmarks/results/tuned_runs.jsonl "$@"
kill "$smi"
