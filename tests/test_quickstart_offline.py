"""The quickstart's own flow on a tiny BERT it saves to disk (offline, fast): the trained adapter is on disk before
the compact export runs, so a failed export loses nothing (issue 27, newcomer item 1)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import VOCAB, tiny_bert_base
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, BertTokenizer

import hub_export
from recipes import quickstart

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]


@pytest.fixture(scope="module")
def offline_inputs(tmp_path_factory) -> tuple[str, str]:
    """A tiny BERT classifier with a word-level tokenizer, and a JSONL data set whose label is the first word's."""
    root = tmp_path_factory.mktemp("quickstart")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root / "model")
    tiny_bert_base().save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(128):
        words = [WORDS[i] for i in torch.randint(len(WORDS), (6,), generator=generator)]
        rows.append({"text": " ".join(words), "label": WORDS.index(words[0]) % 2})
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(root / "model"), str(root / "data.jsonl")


def _argv(offline_inputs, out) -> list[str]:
    model, data = offline_inputs
    return [
        *("--model", model, "--dataset", data, "--base_model", "org/tiny-bert", "--output_dir", str(out)),
        *("--max_steps", "24", "--train_size", "96", "--eval_size", "32", "--batch_size", "8", "--lora_r", "4"),
        *("--target_modules", "query,key,value,dense", "--alpha", "0.25"),
    ]


def test_27_n1_a_failed_export_leaves_the_trained_adapter_loadable(offline_inputs, tmp_path, monkeypatch, capsys):
    def failing_export(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(hub_export, "save_compact", failing_export)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"compact export failed: No space left on device") as exit_:
        quickstart.main(_argv(offline_inputs, out))
    assert f"loradrop compact {out} {out}/compact" in str(exit_.value)
    assert (out / "loradrop_plan.json").is_file() and not (out / "compact").exists()
    result = json.loads((out / "results.json").read_text())
    assert result["adapter_dir"] == str(out) and 0 <= result["accuracy"] <= 1
    base = AutoModelForSequenceClassification.from_pretrained(offline_inputs[0], num_labels=2)
    assert isinstance(PeftModel.from_pretrained(base, out), PeftModel)


def test_27_n1_the_quickstart_writes_adapter_and_compact_adapter_that_agree(offline_inputs, tmp_path):
    out = tmp_path / "out"
    result = quickstart.main(_argv(offline_inputs, out))
    inputs = {"input_ids": torch.tensor([[2, 5, 6, 7, 3]])}
    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(offline_inputs[0], num_labels=2), out
    ).eval()
    compact = hub_export.load_compact(
        AutoModelForSequenceClassification.from_pretrained(offline_inputs[0], num_labels=2), result["compact_dir"]
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(**inputs).logits, plain(**inputs).logits, rtol=0, atol=0)


def test_27_n2_quick_is_a_short_run_of_the_same_recipe():
    quick, default = vars(quickstart.parse_args(["--quick"])), vars(quickstart.parse_args([]))
    assert quick["max_steps"] < default["max_steps"] and quick["train_size"] < default["train_size"]
    assert {key: value for key, value in quick.items() if key not in {*quickstart.QUICK, "quick"}} == {
        key: value for key, value in default.items() if key not in {*quickstart.QUICK, "quick"}
    }
