#!/usr/bin/env bash
# Real GSM8K on one GPU (issue 29 item 2): `bash benchmarks/gsm8k_real_gpu.sh [gemma|qwen] [batch flags]` runs
# benchmarks/gsm8k_real.py batch --model_key KEY (default gemma: Gemma-3-270M base; qwen: Qwen2.5-Coder-1.5B-Instruct);
# the report comes by `python benchmarks/gsm8k_real.py report --model_key KEY` here. Needs what
# `python benchmarks/prepare_carry.py --KEY` packs under .carry/KEY/: every GGUF part stashed by earlier calls
# (python3 benchmarks/carry_models.py --dir .carry/KEY stash) or carried with this one, with manifest.json, and
# .carry/KEY/run (wheels, the GSM8K split) carried with the first call that runs this script. Run it in back-to-back
# calls while the machine stays warm (it goes back after 30 s idle): the wheels, the model, the data, the results and
# the runs' checkpoints stay in /tmp, and each call goes on down the queue, resuming the runs the previous call's
# budget stopped (with --start_late, every call but the last starts runs that cannot finish in it); --resume_from
# also merges the rows committed under benchmarks/results/gsm8k_KEY_runs.jsonl, for a machine that was given back.
# Flags after the key go to gsm8k_real.py batch (e.g. --budget_s 540 --start_late; --jobs defaults to the model's for
# the GPU's memory: Gemma 5 on an H100, 8 on a 141 GB H200; Qwen 4 and 7); the script adds --ends_by, which cuts the
# budget of a call whose set-up took long so that it ends within the tool's 600 s a command. Everything comes back in
# $OUT (at most 7 files); commit its gsm8k_KEY_runs.jsonl as benchmarks/results/gsm8k_KEY_runs.jsonl.
#
# Gemma (5 parts):
#   calls 1-4, carry .carry/gemma/manifest.json .carry/gemma/models.tar.partNN:
#       python3 benchmarks/carry_models.py --dir .carry/gemma stash
#   call 5, carry .carry/gemma/manifest.json .carry/gemma/models.tar.part04 .carry/gemma/run:
#       bash benchmarks/gsm8k_real_gpu.sh gemma --budget_s 540 --start_late
#   call 6 (the last), carrying nothing:   bash benchmarks/gsm8k_real_gpu.sh gemma --budget_s 540
#
# Qwen (`python benchmarks/prepare_carry.py --qwen` printed this for the 19 parts it wrote, 1,066.6 MiB of tar):
#   calls 1-18, each carrying .carry/qwen/manifest.json and one part, models.tar.part00 ... part17 (58.0 MiB each):
#       python3 benchmarks/carry_models.py --dir .carry/qwen stash
#   call 19, carry .carry/qwen/manifest.json .carry/qwen/models.tar.part18 .carry/qwen/run (45.6 MiB):
#       bash benchmarks/gsm8k_real_gpu.sh qwen --budget_s 540 --start_late  # install, unpack, convert, batch
#   then, carrying nothing:   bash benchmarks/gsm8k_real_gpu.sh qwen --budget_s 540 --start_late
#   and last (no --start_late), with --budget_s = the session's budget_left_s (status) less 120 s, at most 540.
# Each call ships the repository too (about 3 MiB): a part and the manifest fill 61 of the tool's 64 MiB a call.
# Fewer calls are not to be had: the GGUF is already 4-bit (xz does not shrink it), and 1,067 MiB of parts with
# 24 MiB of run files need 19 calls even at 60 MiB a call, the most beside the repository.
# (The GGUF holds the output matrix apart from the embedding, as Q6_K: 183 MiB, three calls; dropping it would change
# the model.)
#
# Qwen's time, estimated, not measured (no Qwen run has been made on a GPU yet): the machine's start 1-2 min; calls
# 1-18 back to back, about 20 s each (61 MiB up, a one-second command, the caller's turn-around, which must stay
# under the 30 s the machine waits): about 6 min; call 19 installs the wheels (0.5 min), then checks, joins and
# converts the parts to a bf16 checkpoint on the CPU (2.7 min in all when simulated on this 2-core CPU beside other
# work), and the batch has the rest of the call's 10 min (--ends_by). A run
# (300 steps of 16 sequences, mean padded length 259 tokens; 1,319 problems generated, 256 new tokens; two answer
# losses) is 3-4 min alone on an H100; 3 or 4 of them sharing it about 8-10 min (first_guess_min 9). The plan: r=8 at
# 1e-4, 3e-4, 1e-3 (3 runs, one wave), then at the chosen rate 7 runs (r=8 seed 1, r=2, the default and random:
# seeds 0 and 1), two waves of 4 and 3: about 10 min of transfers and set-up, then 27 min of runs, plus about a
# minute at each call's end for the runs it stops (restart, and up to 25 steps lost). One session (30 min of device
# time, and a machine held at most 30 min) cannot hold it, and the stash does not outlive the machine, so every
# session carries the 19 calls again (about 10 min) and goes on from the committed rows:
#   session 1: the 19 calls, then batch calls until r=8's grid is done (about 8 min): about 20-24 min;
#   session 2: the 19 calls, then the first wave at the chosen rate (seed 0 of r=2, the default, random; r=8 seed 1),
#              about 9-10 min: about 22 min;
#   session 3: the 19 calls, then the last 3 runs (seed 1): about 20 min.
# About 65 min of device time in all. If session 1's rows show runs well under the estimate (wall_minutes), session 2
# may take all 7: keep calling while status's budget_left_s exceeds the next call's budget, and end with a call
# without --start_late (a run stopped at a session's end is lost with the machine).
set -u
begun=$(date +%s)
key=gemma
case "${1:-}" in -* | "") ;; *) key=$1 && shift ;; esac
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # many processes share the GPU's memory
CARRY=.carry/$key
RUN=/tmp/${key}_run  # the carried run files, kept for later calls (gsm8k_real.py's --data default)
if [ ! -d "$RUN/gsm8k" ] && [ -d "$CARRY/run/gsm8k" ]; then
  mkdir -p "$RUN" && cp -r "$CARRY/run/gsm8k" "$CARRY/run/whl" "$RUN"/ || exit 1
fi
[ -d "$RUN/gsm8k" ] || { echo "No GSM8K split in $RUN or $CARRY/run: carry $CARRY/run."; exit 1; }
if [ -d /tmp/site/transformers ]; then  # installed by an earlier call on this machine
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
else
  WHEELS=$RUN/whl source benchmarks/device_setup.sh || exit 1
fi
start=$(date +%s)
python3 benchmarks/carry_models.py --dir "$CARRY" unpack --to /tmp/models || exit 1  # at once once unpacked
echo "unpack: $(($(date +%s) - start)) s"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 15 >"${OUT:?}/smi.csv" 2>&1 &
smi=$!
resume=()
rows=benchmarks/results/gsm8k_${key}_runs.jsonl
[ -f "$rows" ] && resume=(--resume_from "$rows")
python3 benchmarks/gsm8k_real.py batch --model_key "$key" --out "$OUT" --ends_by $((begun + 570)) "${resume[@]}" "$@"
kill "$smi"
