"""recipes/llama2_gsm8k.py, recipes/gsm8k_data.py and the GSM8K answers of recipes/metrics: answer extraction, loss
masks, padding, and the recipe end to end at toy size (tiny random Llama, character-level tokenizer, a few GSM8K-format
rows in JSONL) on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import set_seed

from recipes.gsm8k_data import (
    IGNORE_INDEX,
    build_prompt,
    pad_prompts,
    synthetic_rows,
    tokenize_example,
    training_collator,
)
from recipes.llama2_gsm8k import (
    answer_loss_sums,
    main,
    parse_args,
    tokenize_split,
    toy_model_and_tokenizer,
    toy_tokenizer,
)
from recipes.metrics.gsm8k_exact_match.answers import (
    extract_prediction,
    extract_reference,
    is_correct,
    normalize_number,
)

# ---- answer extraction ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", "72"),
        ("1,234", "1234"),
        ("$1,234.50", "1234.5"),
        ("18.", "18"),
        ("36.0", "36"),
        ("36.00", "36"),
        ("-0", "0"),
        ("+5", "5"),
        ("0.50", "0.5"),
        ("$ 40", "40"),
        ("abc", None),
        (None, None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_extract_reference():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert extract_reference(answer) == "72"
    assert extract_reference("It costs $1,200 in all.\n#### $1,200.") == "1200"
    assert extract_reference("#### -3") == "-3"
    assert extract_reference("no final line 12") is None


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (" She has 3 + 4 = 7 apples.\n#### 7", "7"),
        (" 5 apples, then #### 12 and later 99", "12"),  # after '####' wins over the last number
        (" 3 apples plus 4 apples is 7.", "7"),  # no '####': the last number
        (" It costs $1,234.", "1234"),
        (" 10-4=6", "6"),  # the minus of a subtraction is no sign
        (" #### -5", "-5"),
        (" The answer is 8.\nQuestion: Tom has 30 pens", "8"),  # a new question is not part of the answer
        (" I have 4 apples.\n#### unknown", "4"),  # '####' without a number: the last number before it
        (" I do not know.", None),
        ("", None),
    ],
)
def test_extract_prediction(output, expected):
    assert extract_prediction(output) == expected


def test_is_correct():
    assert is_correct(extract_prediction("so 1,000.0 dollars"), extract_reference("#### 1000"))
    assert not is_correct("7", "8")
    assert not is_correct(None, "8")
    assert not is_correct(None, None)


# ---- prompts, loss mask, padding --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def test_prompt_tokens_and_only_those_are_masked(tokenizer):
    question, answer = "Ann has 3 cats. How many?", "She has 3.\n#### 3"
    row = tokenize_example(question, answer, tokenizer, max_length=512)
    prompt = build_prompt(question)
    n_prompt = 1 + len(prompt)  # <s> + one token per character
    assert prompt == "Question: Ann has 3 cats. How many?\nAnswer:"
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert IGNORE_INDEX not in row["labels"][n_prompt:]
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][n_prompt:], skip_special_tokens=True) == " " + answer
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_truncation_keeps_the_prompt_and_drops_prompts_that_do_not_fit(tokenizer):
    question, answer = "Ann has 3 cats. How many?", "She has 3.\n#### 3"
    n_prompt = 1 + len(build_prompt(question))
    cut = tokenize_example(question, answer, tokenizer, max_length=n_prompt + 4)
    assert len(cut["input_ids"]) == n_prompt + 4
    assert cut["labels"].count(IGNORE_INDEX) == n_prompt
    assert tokenize_example(question, answer, tokenizer, max_length=n_prompt) == {
        "input_ids": [],
        "attention_mask": [],
        "labels": [],
    }


def test_collator_pads_labels_with_ignore_index_on_the_right(tokenizer):
    rows = [tokenize_example(r["question"], r["answer"], tokenizer, 512) for r in synthetic_rows(3, seed=1)]
    batch = training_collator(tokenizer)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
    # labels are -100 exactly on prompt and padding tokens
    n_prompt = [r["labels"].count(IGNORE_INDEX) for r in rows]
    expected = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for i, (row, k) in enumerate(zip(rows, n_prompt)):
        expected[i, :k] = True
        expected[i, len(row["input_ids"]) :] = True
    assert torch.equal(batch["labels"] == IGNORE_INDEX, expected)


def test_collator_left_pads_prompts_for_generation(tokenizer):
    prompts = [tokenizer(build_prompt(q))["input_ids"] for q in ("1+1?", "What is 12 + 30?")]
    batch = pad_prompts(tokenizer, prompts)
    assert "labels" not in batch
    assert batch["input_ids"][0, -len(prompts[0]) :].tolist() == prompts[0]
    assert batch["attention_mask"][0].tolist()[: batch["input_ids"].shape[1] - len(prompts[0])] == [0] * (
        len(prompts[1]) - len(prompts[0])
    )
    assert batch["attention_mask"][1].all()


def test_synthetic_rows_are_gsm8k_format():
    rows = synthetic_rows(12, seed=3)
    assert rows == synthetic_rows(12, seed=3)
    for row in rows:
        final = extract_reference(row["answer"])
        assert final is not None and row["answer"].endswith(f"#### {final}")
        assert extract_prediction(" " + row["answer"]) == final


# ---- the recipe end to end ----------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def gsm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm")
    rows = synthetic_rows(40, seed=7)
    return _write_jsonl(root / "train.jsonl", rows[:32]), _write_jsonl(root / "test.jsonl", rows[32:])


def _toy_argv(out, gsm_files, *extra):
    train, test = gsm_files
    return [
        "--toy",
        "--train_file", train,
        "--eval_file", test,
        "--output_dir", str(out),
        "--max_steps", "12",
        "--alpha", "0.25",
        "--learning_rate", "5e-3",
        "--warmup_ratio", "0",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--max_new_tokens", "24",
        "--save_steps", "0",
        "--logging_steps", "4",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def _hub_export_ready() -> bool:
    if importlib.util.find_spec("hub_export") is None:
        return False
    import hub_export

    return hasattr(hub_export, "save_compact")


def test_recipe_toy_loradrop_end_to_end(tmp_path, gsm_files):
    out = tmp_path / "loradrop"
    argv = _toy_argv(out, gsm_files, "--threshold", "0.5", "--eval_before_training")
    results = main(argv)

    written = json.loads((out / "results.json").read_text())
    assert written["accuracy"] == results["accuracy"]
    assert written["method"] == "loradrop"
    assert 0.0 <= written["accuracy"] <= 1.0
    assert written["eval_samples"] == 8
    assert math.isfinite(written["eval_loss"]) and written["eval_answer_tokens"] > 0
    assert math.isfinite(written["eval_loss_before_training"])
    assert written["global_step"] == 12
    # trained past the switch (step ceil(0.25 * 12) = 3) and pruned
    assert written["plan"] is not None and written["plan"]["switch_step"] == 3
    assert written["plan"]["kept_modules"] < written["plan"]["total_modules"]
    assert written["lora_params_after"] < written["lora_params_before"]
    assert written["kept_fraction"] == pytest.approx(written["lora_params_after"] / written["lora_params_before"])
    assert (out / "loradrop_plan.json").exists()
    assert (out / "adapter_model.safetensors").exists()  # the plain (expanded) PEFT adapter
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(p["reference"] is not None for p in predictions)
    assert written["accuracy"] == sum(p["correct"] for p in predictions) / 8, "the metric module scores as the rows"
    if not _hub_export_ready():
        assert written["compact_dir"] is None
        return
    # The compact adapter and the plain one the Trainer saved load onto the same toy base and agree.
    from peft import PeftModel

    from hub_export import load_compact

    assert written["compact_dir"] == str(out / "compact")
    cfg = parse_args(argv)
    bases = []
    for _ in range(2):
        set_seed(cfg.seed)  # the recipe seeds before building the toy model: the same base weights again
        bases.append(toy_model_and_tokenizer(cfg)[0])
    compact = load_compact(bases[0], out / "compact").eval()
    plain = PeftModel.from_pretrained(bases[1], str(out)).eval()
    ids = torch.tensor([toy_tokenizer()(build_prompt("Ann has 3 cats and buys 4 more. How many?"))["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(compact(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_recipe_toy_plain_lora(tmp_path, gsm_files):
    out = tmp_path / "lora"
    results = main(_toy_argv(out, gsm_files, "--no_loradrop"))
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["method"] == "lora" and written["plan"] is None
    assert written["lora_params_after"] == written["lora_params_before"]
    assert 0.0 <= written["accuracy"] <= 1.0 and math.isfinite(written["eval_loss"])
    assert written["compact_dir"] is None
    assert not (out / "loradrop_plan.json").exists()


def test_recipe_refuses_to_publish_a_local_model_without_its_hub_id_before_training(tmp_path, gsm_files):
    argv = _toy_argv(tmp_path / "out", gsm_files, "--push_to_hub", "user/x")
    argv = [arg for arg in argv if arg != "--toy"] + ["--model", str(tmp_path)]
    with pytest.raises(ValueError, match="--base_model org/name"):
        main(argv)
    with pytest.raises(ValueError, match="no Hub model id"):
        main([*argv, "--base_model", str(tmp_path)])
    assert not (tmp_path / "out").exists(), "refused before anything ran"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "deepspeed"])
def test_recipe_toy_two_ranks(tmp_path, gsm_files, launcher):
    """torchrun with 2 CPU ranks (gloo): evaluation is sharded and gathered, rank 0 alone writes, and the gathered
    answer loss equals a single-process evaluation of the adapter the run saved."""
    if launcher == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    out = tmp_path / launcher
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llama2_gsm8k.py"
    argv = _toy_argv(
        out, gsm_files, "--threshold", "0.5", "--max_eval_samples", "7", "--per_device_eval_batch_size", "2"
    )
    if launcher == "deepspeed":
        argv += ["--deepspeed", str(recipe.parent / "ds_zero2.json")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(recipe), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # gloo may abort at exit after a successful run: judge by what rank 0 wrote
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    written = json.loads((out / "results.json").read_text())
    assert written["world_size"] == 2 and written["global_step"] == 12
    assert written["eval_samples"] == 7 and written["plan"] is not None
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 7
    assert proc.stdout.count("results (") == 1  # rank 0 only

    cfg = parse_args(argv)
    set_seed(cfg.seed)
    base, tokenizer = toy_model_and_tokenizer(cfg)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    rows = load_dataset("json", data_files=cfg.eval_file, split="train").select(range(7))
    features = tokenize_split(rows, tokenizer, cfg, False, "evaluation").to_list()
    loss_sum, n_tokens = answer_loss_sums(model, features, tokenizer, 4)
    assert n_tokens == written["eval_answer_tokens"]
    assert loss_sum / n_tokens == pytest.approx(written["eval_loss"], rel=1e-5)
