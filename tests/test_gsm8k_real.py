"""benchmarks/gsm8k_real.py's queue and report (real GSM8K on Gemma-3-270M), on made-up rows: no model, no data."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATES = (5e-4, 1e-3, 2e-3, 4e-3)


@pytest.fixture
def real(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("gsm8k_real")
    yield module
    sys.modules.pop("gsm8k_real")  # benchmarks/ names its modules plainly: leave none behind


def row(arm: str, lr: float, seed: int, val: float, em: float = 0.2, params: int = 1000) -> dict:
    return {
        "task": "gsm8k-gemma3-270m", "variant": f"{arm} lr={lr:g}", "seed": seed, "arm": arm, "lr": lr,
        "val_loss": val, "test_loss": val + 0.01, "exact_match": em, "adapter_params": params, "hardware": "H100",
        "wall_minutes": 3.0, "train_minutes": 2.0, "peak_gib": 5.0, "steps": 300, "batch": 16,
    }  # fmt: skip


def test_queue_waits_for_the_grid_then_runs_every_arm_at_its_rate(real):
    arms = list(real.GEMMA.arms)
    first = real.planned_runs([], arms, RATES, (0, 1))
    assert first[:4] == [("lora", rate, 0) for rate in RATES]  # r=8's grid first
    assert ("lora@r1", 1e-3, 0) in first[4:] and all(seed == 0 for _, _, seed in first)  # then the own grids
    assert real.planned_runs([], arms, RATES, (0, 1), own_grids=False) == first[:4]

    rows = [row("lora", rate, 0, val) for rate, val in zip(RATES, (1.2, 1.0, 0.9, 0.95))]
    assert real.chosen_rate(rows[:3], RATES) is None
    assert real.chosen_rate(rows, RATES) == 2e-3
    rows.append(row("lora@r1", 2e-3, 0, 1.0))  # an own-grid run at the rate chosen later counts as seed 0
    queue = real.planned_runs(rows, arms, RATES, (0, 1))
    at_rate = [(arm, seed) for arm, rate, seed in queue if rate == 2e-3]
    assert at_rate[:4] == [("lora@r2", 0), (real.DEFAULT, 0), (f"random:{real.DEFAULT}", 0), (arms[-1], 0)]
    assert ("lora@r1", 0) not in at_rate and ("lora", 1) in at_rate and ("lora@r1", 1) in at_rate
    assert queue.index(("lora", 2e-3, 1)) < queue.index(("lora@r1", 5e-4, 0))  # own grids come last


def test_report_on_partial_and_complete_rows(real):
    assert "No runs yet" in real.report([], real.GEMMA)
    partial = real.report([row("lora", 5e-4, 0, 1.2, params=8000)], real.GEMMA)
    assert "grid is incomplete" in partial and "lora lr=0.001 seed 0" in partial

    rows = [row("lora", rate, 0, val, params=8000) for rate, val in zip(RATES, (1.2, 1.0, 0.9, 0.95))]
    rows += [row("lora", 2e-3, 1, 0.91, em=0.22, params=8000)]
    rows += [row("lora@r1", 2e-3, seed, 1.0, em=0.10, params=1000) for seed in (0, 1)]
    rows += [row("lora@r2", 2e-3, seed, 0.95, em=0.15 + 0.01 * seed, params=2000) for seed in (0, 1)]
    rows += [row(real.DEFAULT, 2e-3, seed, 0.92, em=0.25 + 0.01 * seed, params=1900) for seed in (0, 1)]
    text = real.report(rows, real.GEMMA)
    assert "Chosen rate (plain LoRA r=8's lowest validation loss): **0.002**" in text
    assert "| lora@r2 | 0.002 | 2 (0, 1) | 15.5 ± 0.7 |" in text
    verdict = next(line for line in text.splitlines() if line.startswith(f"- {real.DEFAULT} "))
    assert "vs plain LoRA r=1 " in verdict and "exact match 25.5 vs 10.0 (above)" in verdict  # r=2 has more params
    missing = text.split("not yet made: ")[1].split(" (")[0].split(", ")
    assert f"{real.DEFAULT} lr=0.002 seed 0" not in missing and f"random:{real.DEFAULT} lr=0.002 seed 1" in missing


def test_qwen_plan_is_r8_grid_then_four_arms_at_its_rate_two_seeds(real):
    qwen = real.QWEN
    rates, arms = qwen.rates, list(qwen.arms)
    assert arms == ["lora", "lora@r2", real.DEFAULT, f"random:{real.DEFAULT}"] and len(rates) == 3
    assert real.planned_runs([], arms, rates, real.SEEDS, qwen.own_grids) == [("lora", rate, 0) for rate in rates]

    rows = [row("lora", rate, 0, val) for rate, val in zip(rates, (1.0, 0.9, 0.95))]
    queue = real.planned_runs(rows, arms, rates, real.SEEDS, qwen.own_grids)
    assert queue == [(arm, 3e-4, seed) for seed in (0, 1) for arm in arms if (arm, seed) != ("lora", 0)]
    rows += [row(arm, rate, seed, 0.9) for arm, rate, seed in queue]
    assert real.planned_runs(rows, arms, rates, real.SEEDS, qwen.own_grids) == []  # 10 runs in all


def test_each_model_has_its_own_files_and_settings(real, monkeypatch, tmp_path):
    qwen, gemma = real.QWEN, real.GEMMA
    assert qwen.carry_dir == ROOT / ".carry" / "qwen" and gemma.carry_dir == ROOT / ".carry" / "gemma"
    assert (qwen.runs_file.name, qwen.report_file.name) == ("gsm8k_qwen_runs.jsonl", "gsm8k_qwen.md")
    assert (gemma.runs_file.name, gemma.report_file.name) == ("gsm8k_gemma_runs.jsonl", "gsm8k_gemma.md")
    assert qwen.task == "gsm8k-qwen2.5-coder-1.5b-instruct" and gemma.task == "gsm8k-gemma3-270m"
    assert qwen.gguf.hub_id == "Qwen/Qwen2.5-Coder-1.5B-Instruct" and qwen.gguf.chat and qwen.gguf.dtype == "bfloat16"

    monkeypatch.setattr(real, "gpu_mib", lambda: 143_771)  # an H200
    args = real.parse_args(["batch", "--model_key", "qwen", "--out", str(tmp_path)])
    assert (args.model, args.data) == ("/tmp/models/qwen2.5-coder-1.5b-instruct", "/tmp/qwen_run/gsm8k")
    assert (args.results_dir, args.work_dir) == ("/tmp/gsm8k_qwen", "/tmp/gsm8k_qwen/batch")
    assert (args.jobs, args.micro_batch, args.own_grids, args.rates) == (7, 4, False, [1e-4, 3e-4, 1e-3])
    monkeypatch.setattr(real, "gpu_mib", lambda: 81_559)  # an H100
    assert real.parse_args(["batch", "--model_key", "qwen", "--out", str(tmp_path)]).jobs == 4
    args = real.parse_args(["batch", "--model_key", "qwen", "--out", str(tmp_path), "--results_dir", str(tmp_path)])
    (first, *_) = real.batch_jobs(args)
    assert first.name == "lora-lr0.0001-s0" and first.kind == "qwen"
    assert {"--model_key=qwen", "--micro_batch=4", "--generation_batch=330", "--save_every=25"} <= set(first.argv)

    args = real.parse_args(["batch", "--out", str(tmp_path), "--own_grids"])  # Gemma's, as before
    assert (args.model, args.data, args.jobs, args.micro_batch) == (
        "/tmp/models/gemma3-270m",
        "/tmp/gemma_run/gsm8k",
        5,
        8,
    )
    assert real.parse_args(["run", "--arm", "lora", "--lr", "1e-3"]).out == str(gemma.runs_file)
    assert real.parse_args(["report", "--model_key", "qwen"]).md == str(qwen.report_file)
    assert real.parse_args(["carry", "--model_key", "qwen"]).out == qwen.carry_dir


def test_call_sequence_of_qwens_parts(real):
    mib = 2**20
    parts = [{"name": f"models.tar.part{i:02d}", "bytes": 58 * mib} for i in range(18)]
    parts.append({"name": "models.tar.part18", "bytes": int(21.6 * mib)})
    text = real.call_sequence(real.QWEN, Path(".carry/qwen"), parts, 24.1)
    stash = "python3 benchmarks/carry_models.py --dir .carry/qwen stash"
    first = "bash benchmarks/gsm8k_real_gpu.sh qwen --budget_s 540 --start_late"
    assert text.count(stash) == 18 and text.count(first) == 2  # call 19 and the later ones
    assert "18. carry ['.carry/qwen/manifest.json', '.carry/qwen/models.tar.part17'] (58.0 MiB)" in text
    last = "19. carry ['.carry/qwen/manifest.json', '.carry/qwen/models.tar.part18', '.carry/qwen/run'] (45.7 MiB):"
    assert f"{last}\n       {first}" in text
    sizes = [float(line.rsplit("(", 1)[1].split(" MiB")[0]) for line in text.splitlines() if " MiB)" in line]
    assert len(sizes) == 19 and max(sizes) < 60  # each call's carry, beside the repository, within 64 MiB
    assert "carrying nothing: bash benchmarks/gsm8k_real_gpu.sh qwen --budget_s 540 --start_late" in text

    big = [{"name": f"models.tar.part{i:02d}", "bytes": 60 * mib} for i in range(17)]
    big.append({"name": "models.tar.part17", "bytes": int(46.6 * mib)})
    text = real.call_sequence(real.QWEN, Path(".carry/qwen"), big, 24.1)  # 60-MiB parts: still 19 calls
    assert text.count(stash) == 18 and f"19. carry ['.carry/qwen/run'] (24.1 MiB):\n       {first}" in text

    script = (ROOT / "benchmarks" / "gsm8k_real_gpu.sh").read_text()  # its header lists these calls
    assert first in script and stash in script and "call 19, carry .carry/qwen/manifest.json" in script


def test_report_on_qwen_rows(real):
    qwen = real.QWEN

    def qrow(arm, lr, seed, val, em, params):
        return {**row(arm, lr, seed, val, em, params), "task": qwen.task, "peak_reserved_gib": 6.0}

    rows = [qrow("lora", rate, 0, val, 0.5, 9000) for rate, val in zip(qwen.rates, (0.8, 0.7, 0.75))]
    rows += [qrow("lora", 3e-4, 1, 0.71, 0.52, 9000)]
    rows += [qrow("lora@r2", 3e-4, seed, 0.74, 0.45, 2300) for seed in (0, 1)]
    rows += [qrow(real.DEFAULT, 3e-4, seed, 0.73, 0.48 + 0.01 * seed, 2100) for seed in (0, 1)]
    text = real.report(rows, qwen)
    assert text.startswith("# Real GSM8K on Qwen2.5-Coder-1.5B-Instruct: LoRA-drop against plain LoRA (8 runs)")
    assert "Rows: `benchmarks/results/gsm8k_qwen_runs.jsonl`" in text and "gsm8k_real_gpu.sh qwen" in text
    assert "Chosen rate (plain LoRA r=8's lowest validation loss): **0.0003**" in text
    verdict = next(line for line in text.splitlines() if line.startswith(f"- {real.DEFAULT} "))
    assert (
        "vs plain LoRA r=2 (2,300, more than this arm's)" in verdict and "exact match 48.5 vs 45.0 (above)" in verdict
    )
    missing = text.split("not yet made: ")[1].split(" (")[0].split(", ")
    assert sorted(missing) == sorted(f"random:{real.DEFAULT} lr=0.0003 seed {seed}" for seed in (0, 1))
    assert "(2 planned runs left in all)." in text  # no own grids for Qwen
    runs = text.split("## Every run: wall time and peak GPU memory")[1]
    assert (
        "| lora | 0.0001 | 0 | H100 | 3.0 | 2.0 | - | 5.0 (6.0) | - |" in runs and runs.count("\n| ") == 1 + 8
    )  # the header and a row a run


def test_packing_replaces_only_an_earlier_packing(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    prepare_carry = importlib.import_module("prepare_carry")
    staging = tmp_path / "staging"
    (staging / "m-gguf").mkdir(parents=True)
    (staging / "m-gguf" / "m.gguf").write_bytes(b"x" * 3000)
    out = tmp_path / "carry"
    assert len(prepare_carry.write_parts(staging, out, 2048)) == 5  # a tar is whole records of 10,240 bytes
    (out / "run" / "gsm8k").mkdir(parents=True)
    assert len(prepare_carry.write_parts(staging, out, 4096)) == 3  # an earlier packing is replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="did not write"):
        prepare_carry.write_parts(staging, out, 4096)
    assert (out / "notes.txt").read_text() == "mine"
    sys.modules.pop("prepare_carry")


@pytest.mark.slow
def test_qwen_checkpoint_is_bf16_with_its_chat_template():
    """The real Qwen checkpoint (fetched, joined and converted once into the asset cache; later runs only read it)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from recipes.gguf_parts import QWEN25_CODER_15B, converted_path

    path = converted_path(QWEN25_CODER_15B)
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["Qwen2ForCausalLM"] and not config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (28, 1536, 151_936)
    with safe_open(path / "model.safetensors", "pt") as weights:
        names = set(weights.keys())  # a safetensors file is no mapping
        assert {weights.get_slice(name).get_dtype() for name in names} == {"BF16"}
    assert "lm_head.weight" in names  # the GGUF's own output matrix, not the embedding
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
