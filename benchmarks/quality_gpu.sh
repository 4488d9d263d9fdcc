#!/usr/bin/env bash
# The encoder rows of benchmarks/quality.py on a GPU machine, one process per variant in parallel (the models are
# small, so one GPU runs them side by side). Expects .carry/enc (MiniLM stored in fp16 and loaded in fp32, the two
# data sets as JSONL, wheels), made by benchmarks/prepare_carry.py; results go to $OUT.
set -u
WHEELS=.carry/enc/whl source benchmarks/device_setup.sh || exit 1
work=/tmp/quality && mkdir -p $work
data="sarcasm=.carry/enc/sarcasm.jsonl polarity=.carry/enc/polarity.jsonl"
for variant in lora T0.8 T0.9 T0.95 fresh drop random; do
  for task in sarcasm polarity; do
    python3 benchmarks/quality.py run --task $task --variants $variant --seeds 0 1 2 --model .carry/enc/minilm \
      --data $data --work_dir $work --out "$work/runs_${task}_${variant}.jsonl" > "$work/log_${task}_${variant}.txt" 2>&1 &
  done
done
wait
cat $work/runs_*.jsonl > "$OUT/quality_runs.jsonl"
tail -n 5 $work/log_*.txt > "$OUT/logs.txt"
grep -l Traceback $work/log_*.txt && grep -h -A3 Error $work/log_*.txt | head -40
wc -l "$OUT/quality_runs.jsonl"
