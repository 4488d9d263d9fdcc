#!/usr/bin/env bash
# Real GSM8K on Gemma-3-270M base on one GPU (issue 29 item 2; benchmarks/gsm8k_real.py batch, report by
# `python benchmarks/gsm8k_real.py report`). Needs what `python benchmarks/prepare_carry.py --gemma` packs under
# .carry/gemma/: every GGUF part stashed by earlier calls (python3 benchmarks/carry_models.py --dir .carry/gemma stash)
# or carried with this one, with manifest.json, and .carry/gemma/run (wheels, the GSM8K split) carried with the first
# call that runs this script. Run it in back-to-back calls while the machine stays warm: the wheels, the model, the
# data, the results and the runs' checkpoints stay in /tmp, and each call goes on down the queue, resuming the runs
# the previous call's budget stopped (with --start_late, every call but the last starts runs that cannot finish in
# it); --resume_from also merges the rows committed under benchmarks/results/, for a machine that was given back.
# Flags after the script go to gsm8k_real.py batch (e.g. --budget_s 420 --start_late; --jobs defaults to 5 on an
# H100, 8 on a 141 GB H200). Everything comes back in $OUT (at most 7 files).
#
#   calls 1-4, carry .carry/gemma/manifest.json .carry/gemma/models.tar.partNN:
#       python3 benchmarks/carry_models.py --dir .carry/gemma stash
#   call 5, carry .carry/gemma/manifest.json .carry/gemma/models.tar.part04 .carry/gemma/run:
#       bash benchmarks/gsm8k_real_gpu.sh --budget_s 420 --start_late
#   call 6 (the last), carry .carry/gemma/run:   bash benchmarks/gsm8k_real_gpu.sh --budget_s 480
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # many processes share the GPU's memory
RUN=/tmp/gemma_run  # the carried run files, kept for later calls
if [ ! -d "$RUN/gsm8k" ] && [ -d .carry/gemma/run/gsm8k ]; then
  mkdir -p "$RUN" && cp -r .carry/gemma/run/gsm8k .carry/gemma/run/whl "$RUN"/ || exit 1
fi
[ -d "$RUN/gsm8k" ] || { echo "No GSM8K split in $RUN or .carry/gemma/run: carry .carry/gemma/run."; exit 1; }
if [ -d /tmp/site/transformers ]; then  # installed by an earlier call on this machine
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
else
  WHEELS=$RUN/whl source benchmarks/device_setup.sh || exit 1
fi
if [ ! -f /tmp/models/gemma3-270m/config.json ]; then
  start=$(date +%s)
  python3 benchmarks/carry_models.py --dir .carry/gemma unpack --to /tmp/models || exit 1
  echo "unpacked and converted in $(( $(date +%s) - start )) s"
fi
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 15 >"${OUT:?}/smi.csv" 2>&1 &
smi=$!
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
jobs=5 && [ "${mem:-0}" -gt 120000 ] && jobs=8  # about 13 GB a run at its peak: 5 on an H100, 8 on an H200
resume=()
[ -f benchmarks/results/gsm8k_gemma_runs.jsonl ] && resume=(--resume_from benchmarks/results/gsm8k_gemma_runs.jsonl)
python3 benchmarks/gsm8k_real.py batch --out "$OUT" --model /tmp/models/gemma3-270m --data "$RUN/gsm8k" \
  --results_dir /tmp/gsm8k_gemma --jobs "$jobs" "${resume[@]}" "$@"
kill "$smi"
