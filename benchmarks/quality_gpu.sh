#!/usr/bin/env bash
# Every row of benchmarks/quality.py and the measurements of benchmarks/contribution.py on one GPU, in two commands of
# at most 9 minutes: part 1 the decoder with LoRA on all seven kinds (and the contribution runs of both decoder
# tasks), part 2 the encoders and the decoder with LoRA on q,v. Needs what benchmarks/prepare_carry.py packs:
# .carry/run (wheels, data) carried with each command, and every part of .carry/models carried before it or with it
# (benchmarks/carry_models.py stash keeps them in /tmp). Results go straight to $OUT; flags after the part go to
# benchmarks/gpu_batch.py (e.g. --candidate relative --budget_s 450).
#
#   bash benchmarks/quality_gpu.sh 1        # then, right after it:  bash benchmarks/quality_gpu.sh 2
set -u
part=${1:?usage: benchmarks/quality_gpu.sh 1|2 [gpu_batch.py flags]}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # many processes share the GPU's memory
WHEELS=.carry/run/whl source benchmarks/device_setup.sh || exit 1
python3 benchmarks/carry_models.py unpack --to /tmp/models || exit 1
python3 benchmarks/gpu_batch.py --part "$part" --out "${OUT:?}" --models /tmp/models --data .carry/run "${@:2}"
