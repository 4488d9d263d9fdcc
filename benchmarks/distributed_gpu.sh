#!/usr/bin/env bash
# The recipe on 2 GPUs at Llama-2-7B width (random weights), bf16, activation checkpointing: DeepSpeed ZeRO-2 and
# DDP, LoRA-drop and plain LoRA, and a resume from a checkpoint saved after the switch. Results go to $OUT.
# SIZE/STEPS/SAVE/EXTRA let the same script run at toy size on a CPU (SIZE=tiny STEPS=12 SAVE=8).
set -u
source benchmarks/device_setup.sh || exit 1
runs=${RUNS:-/tmp/runs}; mkdir -p "$runs"
common="--toy --toy_size ${SIZE:-llama2-7b} --bf16 --activation_checkpointing --max_steps ${STEPS:-30} --alpha 0.3
  --warmup_ratio 0 --per_device_train_batch_size 4 --max_length 512 --max_eval_samples 8 --max_new_tokens 8
  --logging_steps 1 --save_steps ${SAVE:-20} --report_to none ${EXTRA:-}"
port=29500
launch() {  # NAME, then recipe flags
  port=$((port + 1))
  echo "== $1 $(date +%T)"
  torchrun --nproc_per_node 2 --master_port $port benchmarks/recipe_gpu.py $common --output_dir "$runs/$1" "${@:2}" \
    > "$runs/$1.log" 2>&1 || { echo "$1 failed:"; tail -n 30 "$runs/$1.log"; }
}
launch ds_loradrop --deepspeed recipes/ds_zero2.json
launch ds_lora --deepspeed recipes/ds_zero2.json --no_loradrop
launch ds_resume --deepspeed recipes/ds_zero2.json --resume_from_checkpoint "$runs/ds_loradrop/checkpoint-${SAVE:-20}"
launch ddp_loradrop
launch ddp_lora --no_loradrop
echo "== done $(date +%T)"
out=${OUT:-$runs}
python3 benchmarks/recipe_gpu.py summarise "$runs"/ds_loradrop "$runs"/ds_lora "$runs"/ds_resume "$runs"/ddp_loradrop \
  "$runs"/ddp_lora > "$out/summary.json"
{ echo '{"deepspeed":'; python3 benchmarks/recipe_gpu.py compare "$runs"/ds_loradrop "$runs"/ds_lora
  echo ',"ddp":'; python3 benchmarks/recipe_gpu.py compare "$runs"/ddp_loradrop "$runs"/ddp_lora; echo '}'; } > "$out/ratios.json"
grep -h "results (" "$runs"/*.log > "$out/results_lines.txt"
cat "$out/ratios.json"
python3 - "$out/summary.json" <<'PY'
import json, sys
for run, r in json.load(open(sys.argv[1])).items():
    print(run.split("/")[-1], {k: r.get(k) for k in ("ranks_identical_lora", "ranks_identical_plan", "switch_step", "kept_modules", "lora_sha256")})
PY
