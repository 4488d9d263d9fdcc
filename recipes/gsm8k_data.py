"""GSM8K data for the LoRA-drop recipes: prompts, loss masks, padding, toy and offline rows.

Everything here is a plain function of its inputs, so tests can check it without a model or a Trainer:

- :func:`build_prompt` / :func:`tokenize_example`: ``"Question: ...\\nAnswer:"`` (or the tokenizer's chat template)
  followed by the reference solution; the prompt tokens get label -100, so only the answer is learned and scored.
- :func:`training_collator` / :func:`pad_prompts`: batches padded on the right for training (labels -100, attention
  mask 0; transformers' `DataCollatorForSeq2Seq`), or prompts padded on the left for generation.
- :func:`synthetic_rows`: a handful of GSM8K-format problems made up in code, for the offline ``--toy`` run.

Scoring (the final number, exact match) is the `gsm8k_exact_match` evaluate module in ``recipes/metrics``.

Run as a module to write offline GSM8K-format training data from GSM-Symbolic (reasoning-gym, fetched from PyPI by
``recipes.assets``)::

    python -m recipes.gsm8k_data --out data/gsm_symbolic --train_n 2000 --eval_n 200
    # -> data/gsm_symbolic/train.jsonl, data/gsm_symbolic/test.jsonl with {"question", "answer"} rows
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from transformers import BatchEncoding, DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from recipes.metrics.gsm8k_exact_match.answers import ANSWER_MARK

IGNORE_INDEX = -100
"""Label value that `torch.nn.CrossEntropyLoss` (and every Hugging Face model) leaves out of the loss."""

PLAIN_PROMPT = "Question: {question}\nAnswer:"
"""The prompt when no chat template is used; the target follows after one space."""


# ----------------------------------------------------------------------------------------------------------------
# Prompts, tokenisation and the loss mask
# ----------------------------------------------------------------------------------------------------------------


def build_prompt(question: str, tokenizer: Any = None, use_chat_template: bool = False) -> str:
    """The text the model sees before its answer (also the generation prompt at evaluation)."""
    if use_chat_template:
        messages = [{"role": "user", "content": question.strip()}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_PROMPT.format(question=question.strip())


def build_full_text(question: str, answer: str, tokenizer: Any = None, use_chat_template: bool = False) -> str:
    """Prompt followed by the reference solution (the chat template closes the assistant turn itself)."""
    if use_chat_template:
        messages = [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer.strip()}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return build_prompt(question) + " " + answer.strip()


def tokenize_example(
    question: str, answer: str, tokenizer: Any, max_length: int, use_chat_template: bool = False
) -> dict[str, list[int]]:
    """Token ids, attention mask and labels of one problem; labels are -100 on every prompt token.

    The prompt and the full text are tokenised separately and the answer starts where their ids stop agreeing, so
    the boundary is exact even when a tokenizer merges characters across it. Without a chat template the tokenizer's
    own special tokens (Llama's BOS) are added and EOS is appended, so the model learns to stop after ``#### N``; a
    chat template writes its special tokens in the text. Sequences longer than `max_length` lose the end of their
    answer; a problem whose prompt alone fills `max_length` comes back with empty lists (filter it out).
    """
    add_special = not use_chat_template
    prompt_ids = tokenizer(build_prompt(question, tokenizer, use_chat_template), add_special_tokens=add_special)[
        "input_ids"
    ]
    full_ids = tokenizer(
        build_full_text(question, answer, tokenizer, use_chat_template), add_special_tokens=add_special
    )["input_ids"]
    eos = tokenizer.eos_token_id
    if not use_chat_template and eos is not None and (not full_ids or full_ids[-1] != eos):
        full_ids = [*full_ids, eos]
    boundary = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        boundary += 1
    full_ids = full_ids[:max_length]
    if boundary >= len(full_ids):
        return {"input_ids": [], "attention_mask": [], "labels": []}
    labels = [IGNORE_INDEX] * boundary + full_ids[boundary:]
    return {"input_ids": full_ids, "attention_mask": [1] * len(full_ids), "labels": labels}


def training_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Batches for training and for the answer loss: input ids padded with the pad token, attention mask with 0 and
    labels with -100, so padding never counts in the loss. It pads on the tokenizer's side, which the recipe sets to
    the right: left padding would shift every position of a causal LM's inputs."""
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)


def pad_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]) -> BatchEncoding:
    """Token ids of prompts as one batch padded on the left, so that every prompt ends in the last column, where
    generation continues."""
    return tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------
# Offline data
# ----------------------------------------------------------------------------------------------------------------

_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Liam")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "books")


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` GSM8K-format problems (``question``, ``answer`` ending in ``#### N``) made up from a few templates."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            total = a + b
            question = f"{name} has {a} {item}. A friend gives {name} {b} more. How many {item} does {name} have now?"
            answer = f"{name} has {a} + {b} = <<{a}+{b}={total}>>{total} {item}.\n{ANSWER_MARK} {total}"
        elif kind == 1:
            big, small = max(a, b) + c, min(a, b)
            total = big - small
            question = f"{name} had {big} {item} and gave away {small}. How many {item} are left?"
            answer = (
                f"{name} has {big} - {small} = <<{big}-{small}={total}>>{total} {item} left.\n{ANSWER_MARK} {total}"
            )
        else:
            total = a * c
            question = f"{name} buys {c} bags with {a} {item} in each bag. How many {item} does {name} buy?"
            answer = f"{name} buys {c} * {a} = <<{c}*{a}={total}>>{total} {item}.\n{ANSWER_MARK} {total}"
        rows.append({"question": question, "answer": answer})
    return rows


def write_gsm_symbolic(out_dir: str | Path, train_n: int, eval_n: int, seed: int = 0) -> tuple[Path, Path]:
    """Write `train_n` + `eval_n` GSM-Symbolic problems as ``train.jsonl`` and ``test.jsonl`` under `out_dir`.

    Both splits come from one generator stream (the first `train_n` problems train, the next `eval_n` evaluate), so
    no problem is in both.
    """
    from recipes.assets import gsm_symbolic, write_gsm8k_jsonl  # fetches reasoning-gym from PyPI on first use

    rows = gsm_symbolic(train_n + eval_n, seed)
    out = Path(out_dir)
    return write_gsm8k_jsonl(out / "train.jsonl", rows[:train_n]), write_gsm8k_jsonl(out / "test.jsonl", rows[train_n:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.gsm8k_data", description=write_gsm_symbolic.__doc__)
    parser.add_argument("--out", default="data/gsm_symbolic", help="output directory (default data/gsm_symbolic)")
    parser.add_argument("--train_n", type=int, default=2000, help="training problems (default 2000)")
    parser.add_argument("--eval_n", type=int, default=200, help="evaluation problems (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args(argv)
    train, test = write_gsm_symbolic(args.out, args.train_n, args.eval_n, args.seed)
    print(f"wrote {train} ({args.train_n} rows) and {test} ({args.eval_n} rows)")
    print(f"train with: python recipes/llama2_gsm8k.py --train_file {train} --eval_file {test} ...")


if __name__ == "__main__":
    main()
