"""Served as trained (issue 30): a default-trained adapter (mode "truncate", truncated modules at rank 1) in every form
`loradrop expand --for` writes, and the file `trainer.save_model()` writes, computes the trained logits in PEFT and
under the scaling rules of the engines that ignore PEFT's patterns, re-stated here from their source:

- vLLM (`vllm/lora/peft_helper.py`, `PEFTHelper.__post_init__`): one `vllm_lora_scaling_factor = lora_alpha / r`
  (`/ sqrt(r)` with `use_rslora`) for every module; `rank_pattern` and `alpha_pattern` are not fields it reads
  (`from_dict` drops unknown keys); `modules_to_save` is refused.
- llama.cpp (`convert_lora_to_gguf.py` reads `lora_alpha` alone from adapter_config.json; `src/llama-adapter.cpp`
  scales each tensor pair by `alpha / rank`, its rank being the pair's own `lora_a` dimension): no pattern, no rsLoRA.

The `peft` (rank_pattern) form is shown wrong under vLLM's rule, so these tests can fail.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    INPUTS,
    LLAMA_TARGETS,
    SHARING,
    VOCAB,
    TokenDataset,
    craft_compact,
    model_logits,
    one_line_error,
    tiny_llama_base,
    training_args,
    tree_bytes,
)
from hub_server import DEFAULT_USER
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from hub_export import (
    CompactFormatError,
    PlanError,
    compact_peft_adapter,
    export_adapter,
    load_compact,
    pull,
    push_to_hub,
    save_compact,
)
from hub_export.cli import main as loradrop
from loradrop_trainer import LoraDropCallback

# The trained logits against an engine rule's, which adds each module's product into the base weights (as vLLM's
# and llama.cpp's kernels do not, so float32 sums differ in order): relative to the largest logit. A module scaled
# 1/8 of what it trained with is off by far more (asserted below).
RULE_RTOL = 1e-5


@dataclasses.dataclass
class Run:
    model: PeftModel
    callback: LoraDropCallback
    saved: Path
    compact: Path
    logits: torch.Tensor


def default_llama(**lora_kwargs) -> PeftModel:
    """The issue's set-up at test size: LoRA r=8 (lora_alpha 16) on all seven kinds of a tiny Llama."""
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(tiny_llama_base(), dataclasses.replace(lora, **lora_kwargs))


def train(root: Path, model: PeftModel) -> Run:
    """Train with `LoraDropCallback()`'s defaults but `alpha` (switch at step 3 of 12), save as a Trainer user does."""
    callback = LoraDropCallback(alpha=0.25)
    args = training_args(root, max_steps=12, save_strategy="steps", save_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train()
    trainer.save_model()
    assert callback.plan.mode == "truncate" and callback.plan.dropped_rank == 1 and callback.plan.dropped
    return Run(model, callback, Path(args.output_dir), save_compact(model, root / "compact"), model_logits(model))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return train(tmp_path_factory.mktemp("serving"), default_llama())


# ---------------------------------------------------------------------------------------------- the engines' rules


def _adapter_files(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((directory / "adapter_config.json").read_text()), load_file(
        directory / "adapter_model.safetensors"
    )


def _with_deltas(deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base model with `{module name: delta}` added to its weights."""
    model = tiny_llama_base()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight += delta
    return model


def _pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{base module name: (lora_A, lora_B)}`, named as llama.cpp's `get_base_tensor_name` strips PEFT's prefix."""
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (
            a,
            weights[key.replace("lora_A", "lora_B")],
        )
        for key, a in weights.items()
        if key.endswith(".lora_A.weight")
    }


def vllm_logits(directory: Path) -> torch.Tensor:
    """vLLM's rule: every module scaled by the config's one `lora_alpha / r` (rsLoRA: `/ sqrt(r)`)."""
    config, weights = _adapter_files(directory)
    if config.get("modules_to_save"):
        raise ValueError("vLLM only supports modules_to_save being None.")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return model_logits(_with_deltas({name: scaling * b @ a for name, (a, b) in _pairs(weights).items()}))


def llamacpp_logits(directory: Path) -> torch.Tensor:
    """llama.cpp's rule: each tensor pair scaled by `lora_alpha / (its own rank)`; nothing else of the config read."""
    alpha = _adapter_files(directory)[0]["lora_alpha"]
    pairs = _pairs(_adapter_files(directory)[1])
    return model_logits(_with_deltas({name: alpha / a.shape[0] * b @ a for name, (a, b) in pairs.items()}))


def peft_logits(directory: Path) -> torch.Tensor:
    return model_logits(PeftModel.from_pretrained(tiny_llama_base(), str(directory)))


def merged_logits(directory: Path) -> torch.Tensor:
    return model_logits(PeftModel.from_pretrained(tiny_llama_base(), str(directory)).merge_and_unload())


def assert_close(logits: torch.Tensor, trained: torch.Tensor) -> None:
    torch.testing.assert_close(logits, trained, rtol=0, atol=RULE_RTOL * float(trained.abs().max()))


def assert_wrong(logits: torch.Tensor, trained: torch.Tensor) -> None:
    assert float((logits - trained).abs().max()) > 1e-2 * float(trained.abs().max())


# ---------------------------------------------------------------------------------------------- the forms


def test_uniform_form_is_exact_in_peft_and_right_under_every_rule(run, tmp_path):
    out = export_adapter(run.compact, tmp_path / "uniform", form="uniform")
    config, weights = _adapter_files(out)
    assert config["r"] == 8 and not config["rank_pattern"] and not config["alpha_pattern"]
    assert {tensor.shape[0] for key, tensor in weights.items() if "lora_A" in key} == {8}
    torch.testing.assert_close(peft_logits(out), run.logits, rtol=0, atol=0)
    assert_close(vllm_logits(out), run.logits)
    assert_close(llamacpp_logits(out), run.logits)
    assert_close(merged_logits(out), run.logits)


def test_peft_form_is_right_in_peft_and_llamacpp_and_wrong_under_vllms_rule(run, tmp_path):
    out = export_adapter(run.compact, tmp_path / "peft", form="peft")
    config, _ = _adapter_files(out)
    assert config["rank_pattern"] and set(config["rank_pattern"].values()) == {1}
    assert_close(peft_logits(out), run.logits)
    assert_close(llamacpp_logits(out), run.logits)
    assert_close(merged_logits(out), run.logits)
    assert_wrong(vllm_logits(out), run.logits)


def test_merged_form_computes_the_trained_model(run, tmp_path, capsys):
    base = tmp_path / "base"
    tiny_llama_base().save_pretrained(base)
    assert loradrop(["expand", str(run.compact), str(tmp_path / "merged"), "--for", "merged", "--base", str(base)]) == 0
    assert "merged model written to" in capsys.readouterr().out
    merged = type(tiny_llama_base()).from_pretrained(tmp_path / "merged")
    assert_close(model_logits(merged), run.logits)


def test_cli_writes_each_form(run, tmp_path, capsys):
    for form in ("peft", "uniform", "vllm"):
        assert loradrop(["expand", str(run.compact), str(tmp_path / form), "--for", form]) == 0
        out = capsys.readouterr().out
        assert f"({form} form)" in out and ("not by vLLM" in out) == (form == "peft")
    uniform, vllm = (tmp_path / form / "adapter_model.safetensors" for form in ("uniform", "vllm"))
    assert uniform.read_bytes() == vllm.read_bytes()


def test_user_patterns_and_rslora_are_folded_too(tmp_path, caplog):
    """A user's own alpha_pattern and rank_pattern, and rsLoRA, are folded into the uniform form as well: vLLM's and
    llama.cpp's rules give the trained logits (the rank-pattern form is wrong under both). trainer.save_model() keeps
    them, as PEFT does, and the switch warns so, naming the export that folds them."""
    model = default_llama(rank_pattern={"down_proj": 4}, alpha_pattern={"up_proj": 4}, use_rslora=True)
    with caplog.at_level("WARNING"):
        trained = train(tmp_path, model)
    assert "keeps your LoraConfig's rank_pattern and alpha_pattern and use_rslora" in caplog.text
    assert "--for uniform" in caplog.text
    uniform = export_adapter(trained.compact, tmp_path / "uniform", form="uniform")
    assert not _adapter_files(uniform)[0]["use_rslora"]
    assert_close(peft_logits(uniform), trained.logits)
    assert_close(vllm_logits(uniform), trained.logits)
    assert_close(llamacpp_logits(uniform), trained.logits)
    peft_form = export_adapter(trained.compact, tmp_path / "peft", form="peft")
    assert_wrong(vllm_logits(peft_form), trained.logits)
    assert_wrong(llamacpp_logits(peft_form), trained.logits)


# ---------------------------------------------------------------------------------------------- trainer.save_model()


def test_save_model_output_is_right_in_every_engine(run, tmp_path):
    """What the Trainer writes after the switch needs no alpha_pattern: each truncated lora_B carries its scaling, so
    PEFT gives the trained logits bit for bit and vLLM's and llama.cpp's rules give them too. The same model saved in
    the form the scaling used to be recorded in (alpha_pattern) is wrong under vLLM's rule and llama.cpp's."""
    config, _ = _adapter_files(run.saved)
    assert config["alpha_pattern"] == {} and config["rank_pattern"] == {} and config["r"] == 8
    torch.testing.assert_close(peft_logits(run.saved), run.logits, rtol=0, atol=0)
    assert_close(vllm_logits(run.saved), run.logits)
    assert_close(llamacpp_logits(run.saved), run.logits)
    assert_close(merged_logits(run.saved), run.logits)
    assert run.model.peft_config["default"].alpha_pattern, "the model in memory keeps its own record"

    twin = copy.deepcopy(run.model)  # saves its own weights, folded
    with torch.no_grad():
        for name, param in twin.named_parameters():
            param.mul_(0.5 if "lora_B" in name else 1)
    twin.save_pretrained(str(tmp_path / "twin"))
    torch.testing.assert_close(peft_logits(tmp_path / "twin"), model_logits(twin), rtol=0, atol=0)

    recorded = tmp_path / "recorded"
    PeftModel.save_pretrained(run.model, str(recorded))  # the class's own method: the scaling in alpha_pattern
    torch.testing.assert_close(peft_logits(recorded), run.logits, rtol=0, atol=0)
    assert_wrong(vllm_logits(recorded), run.logits)
    assert_wrong(llamacpp_logits(recorded), run.logits)


def test_a_checkpoint_after_the_switch_is_right_in_every_engine_and_compacts(run, tmp_path):
    checkpoint = run.saved / "checkpoint-8"
    as_saved = model_logits(load_compact(tiny_llama_base(), compact_peft_adapter(checkpoint, tmp_path / "compact")))
    torch.testing.assert_close(peft_logits(checkpoint), as_saved, rtol=0, atol=0)
    assert_close(vllm_logits(checkpoint), as_saved)
    assert_close(llamacpp_logits(checkpoint), as_saved)


def test_keep_scaling_folds_nothing_and_its_output_is_never_unfolded(tmp_path):
    """dropped_scaling="keep": truncated modules are scaled as the config says already, so save_pretrained is PEFT's
    own and its output is right under vLLM's rule as it is; `loradrop compact` reads the run's setting from its plan
    file and never divides that output by a factor it does not hold: it says the output needs no compacting."""
    model = default_llama()
    callback = LoraDropCallback(alpha=0.25, dropped_scaling="keep")
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train()
    trainer.save_model()
    assert "save_pretrained" not in vars(model) and callback.plan.dropped
    assert_close(vllm_logits(tmp_path / "out"), model_logits(model))
    with pytest.raises(PlanError, match=r"dropped_scaling='keep'.*already a plain LoRA with one scaling"):
        compact_peft_adapter(tmp_path / "out", tmp_path / "compact")


class BestAt(TrainerCallback):
    """Adds the metric `eval_closeness`, largest at step `best`, so that the Trainer ends by loading that checkpoint."""

    def __init__(self, best: int) -> None:
        self.best = best

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_closeness"] = -abs(state.global_step - self.best)


def test_load_best_model_at_end_after_the_switch_unfolds_what_it_loaded(tmp_path, caplog):
    """The Trainer loads the best checkpoint's adapter file (folded) into the model in training: the model must hold
    that checkpoint's weights as trained, so it computes what the file computes in PEFT, and saves it again so."""
    model = default_llama()
    best = {"eval_strategy": "steps", "eval_steps": 4, "load_best_model_at_end": True}
    args = training_args(tmp_path, max_steps=12, save_strategy="steps", save_steps=4, **best)
    args.metric_for_best_model, args.greater_is_better = "closeness", True
    callback = LoraDropCallback(alpha=0.25)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(n=8, seed=1),
        callbacks=[callback, BestAt(8)],
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "keeps your LoraConfig" not in caplog.text, "no warning where the user set no pattern of their own"
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-8") and callback.plan.step == 3
    from_file = peft_logits(Path(trainer.state.best_model_checkpoint))
    torch.testing.assert_close(model_logits(model), from_file, rtol=0, atol=0)
    trainer.save_model(str(tmp_path / "final"))
    torch.testing.assert_close(peft_logits(tmp_path / "final"), from_file, rtol=0, atol=0)


def test_resume_refuses_weights_that_are_neither_the_model_s_nor_the_file_s(run, tmp_path):
    checkpoint = Path(shutil.copytree(run.saved / "checkpoint-8", tmp_path / "checkpoint-8"))
    weights = load_file(checkpoint / "adapter_model.safetensors")
    name = next(
        key for key in weights if "lora_B" in key and key.removesuffix(".lora_B.weight") in run.callback.plan.dropped
    )
    weights[name] = weights[name] * 3
    save_file(weights, checkpoint / "adapter_model.safetensors", metadata={"format": "pt"})
    args = training_args(tmp_path, max_steps=12, save_strategy="no")
    trainer = Trainer(
        model=default_llama(), args=args, train_dataset=TokenDataset(), callbacks=[LoraDropCallback(alpha=0.25)]
    )
    with pytest.raises(ValueError, match="neither those the model held when it was saved nor those of its adapter"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# ---------------------------------------------------------------------------------------------- the Hub


REPO = f"{DEFAULT_USER}/served"
HUB_BASE = f"{DEFAULT_USER}/tiny-llama-base"


def test_the_repo_root_serves_every_engine_and_the_card_says_how(hub, run, tmp_path):
    """The root is the uniform form (PEFT exact, vLLM's and llama.cpp's rules right), rank_pattern/ the smallest form;
    the card's Python snippets run as written and give the trained logits, and it gives vLLM's and llama.cpp's lines
    (bash, for the root). A pull writes the same files again from the compact adapter."""
    tiny_llama_base().save_pretrained(tmp_path / "base")
    hub.create_repo(HUB_BASE)
    hub.commit(HUB_BASE, tree_bytes(tmp_path / "base"))
    info = push_to_hub(run.compact, REPO, base_model=HUB_BASE)
    assert {"adapter_model.safetensors", "rank_pattern/adapter_model.safetensors"} <= set(info.files)
    pulled = pull(REPO, tmp_path / "pulled")
    assert_close(vllm_logits(pulled), run.logits)
    assert_close(llamacpp_logits(pulled), run.logits)
    assert_wrong(vllm_logits(pulled / "rank_pattern"), run.logits)
    files = hub.files_at(REPO)
    assert all(files[name] == (pulled / name).read_bytes() for name in info.files if name != "README.md")
    card = files["README.md"].decode()
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 3 and any('subfolder="rank_pattern"' in snippet for snippet in snippets)
    for snippet in snippets:
        namespace: dict = {}
        exec(snippet, namespace)
        trained = {"rtol": 0, "atol": 0} if "subfolder" not in snippet else {"rtol": 0, "atol": 1e-5}
        torch.testing.assert_close(model_logits(namespace["model"]), run.logits, **trained)
    assert f"vllm serve {HUB_BASE} --enable-lora --max-lora-rank 8 --lora-modules loradrop={REPO}" in card
    assert f"convert_lora_to_gguf.py $(hf download {REPO} adapter_config.json adapter_model.safetensors)" in card


def test_a_push_of_a_shared_adapter_removes_the_rank_pattern_form_an_earlier_push_left(hub, run, tmp_path):
    push_to_hub(run.compact, REPO)
    assert "rank_pattern/adapter_model.safetensors" in hub.files_at(REPO)
    model = default_llama()
    args = training_args(tmp_path, max_steps=12)
    callback = LoraDropCallback(alpha=0.25, **SHARING)
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    push_to_hub(save_compact(model, tmp_path / "shared"), REPO)
    assert not any(name.startswith("rank_pattern/") for name in hub.files_at(REPO))
    torch.testing.assert_close(peft_logits_from(REPO), model_logits(model), rtol=0, atol=0)


def peft_logits_from(repo_id: str) -> torch.Tensor:
    return model_logits(PeftModel.from_pretrained(tiny_llama_base(), repo_id))


def test_the_card_offers_no_engine_line_that_would_fail_or_compute_otherwise(hub, tmp_path):
    trained = train(tmp_path, default_llama(modules_to_save=["lm_head"]))
    push_to_hub(trained.compact, REPO, base_model=HUB_BASE)
    card = hub.files_at(REPO)["README.md"].decode()
    assert "vllm serve" not in card and "convert_lora_to_gguf" not in card
    assert "vLLM and llama.cpp refuse adapters that train modules in full" in card


# ---------------------------------------------------------------------------------------------- refusals


def test_vllm_form_refuses_modules_to_save_in_one_line_before_writing(tmp_path, capsys):
    trained = train(tmp_path, default_llama(modules_to_save=["lm_head"]))
    target = tmp_path / "vllm"
    assert loradrop(["expand", str(trained.compact), str(target), "--for", "vllm"]) == 1
    assert "modules_to_save" in one_line_error(capsys) and not target.exists()
    with pytest.raises(CompactFormatError, match="vLLM refuses"):
        export_adapter(trained.compact, target, form="vllm")
    assert not target.exists()
    assert_close(peft_logits(export_adapter(trained.compact, tmp_path / "uniform")), trained.logits)


def test_vllm_form_refuses_a_rank_above_its_limit(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hub_export.serving.VLLM_MAX_RANKS", (4,))
    assert loradrop(["expand", str(run.compact), str(tmp_path / "vllm"), "--for", "vllm"]) == 1
    assert "rank 8, above 4" in one_line_error(capsys) and not (tmp_path / "vllm").exists()


def test_a_zero_lora_alpha_with_modules_scaled_otherwise_is_refused(run, tmp_path, capsys):
    """lora_alpha 0 and a kept module scaled by the user's alpha_pattern: one `lora_alpha / r` of 0 cannot carry it."""
    kept = run.callback.plan.kept[0].removeprefix("base_model.model.")

    def zero_alpha(config: dict) -> None:
        config["alpha_pattern"] = {**dict.fromkeys(config["alpha_pattern"], 0.0), re.escape(kept): 8}
        config["lora_alpha"] = 0

    crafted = craft_compact(run.compact, tmp_path / "crafted", config=zero_alpha)
    assert loradrop(["expand", str(crafted), str(tmp_path / "uniform"), "--for", "uniform"]) == 1
    assert "lora_alpha 0" in one_line_error(capsys) and not (tmp_path / "uniform").exists()


def test_merged_needs_a_base_and_only_merged_takes_one(run, tmp_path, capsys):
    assert loradrop(["expand", str(run.compact), str(tmp_path / "m"), "--for", "merged"]) == 1
    assert "--base" in one_line_error(capsys)
    assert loradrop(["expand", str(run.compact), str(tmp_path / "m"), "--for", "merged", "--base", "nowhere"]) == 1
    assert "nowhere is not a directory" in one_line_error(capsys)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    busy = ["expand", str(run.compact), str(tmp_path / "busy"), "--for", "merged", "--base", "nowhere"]
    assert loradrop(busy) == 1 and "holds notes.txt" in one_line_error(capsys), "refused before the base is loaded"
    assert loradrop(["expand", str(run.compact), str(tmp_path / "m"), "--for", "uniform", "--base", str(tmp_path)]) == 1
    assert "--base" in one_line_error(capsys) and not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="a merged model has none"):
        export_adapter(run.compact, tmp_path / "m", form="merged", base=tiny_llama_base(), base_model="org/base")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- real llama.cpp


# llama.cpp's float32 CPU kernels against torch's on the tiny model, relative to the largest logit; a module scaled by
# 1/8 of its training scaling is off by more than 1e-2 (asserted).
LLAMACPP_RTOL = 1e-3


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory):
    """(llama_cpp module, llama.cpp source directory, the tiny base model as GGUF, its Hugging Face directory); the
    test using it is skipped where llama-cpp-python, sentencepiece or the llama.cpp source are missing."""
    llama_cpp = pytest.importorskip("llama_cpp")
    spm = pytest.importorskip("sentencepiece")
    source = Path(os.environ.get("LLAMA_CPP_DIR", ""))
    if not (source / "convert_lora_to_gguf.py").is_file():
        pytest.skip("set LLAMA_CPP_DIR to the llama.cpp source llama_cpp was built from (convert_*_to_gguf.py)")
    root = tmp_path_factory.mktemp("llamacpp")
    base = root / "base"
    tiny_llama_base().save_pretrained(base)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"word{i} token{i % 7} piece{i % 13}" for i in range(400)), "utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(base / "tokenizer"), vocab_size=VOCAB - 16, model_type="bpe"
    )
    _convert(source, "convert_hf_to_gguf.py", str(base), "--outfile", str(root / "base.gguf"), "--outtype", "f32")
    return llama_cpp, source, root / "base.gguf", base


def _convert(source: Path, script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), *sys.path])}
    subprocess.run([sys.executable, str(source / script), *args], check=True, env=env, capture_output=True)


def real_llamacpp_logits(llamacpp, adapter: Path, tmp_path: Path) -> torch.Tensor:
    """The logits llama.cpp computes for `INPUTS` with the PEFT adapter directory `adapter`, converted to GGUF."""
    llama_cpp, source, base_gguf, base = llamacpp
    lora = tmp_path / f"{adapter.name}.gguf"
    _convert(source, "convert_lora_to_gguf.py", str(adapter), "--base", str(base), "--outfile", str(lora))
    model = llama_cpp.Llama(
        model_path=str(base_gguf), lora_path=str(lora), n_ctx=64, logits_all=True, verbose=False, n_threads=1
    )
    rows = []
    for ids in INPUTS.tolist():
        model.reset()
        model.eval(ids)
        rows.append(torch.tensor(model.scores[: len(ids)], dtype=torch.float32))
    return torch.stack(rows)


def _relative(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max()) / float(reference.abs().max())


@pytest.mark.slow
def test_real_llamacpp_computes_the_trained_model_from_the_uniform_form_and_the_trainers_output(
    llamacpp, run, tmp_path
):
    """In real llama.cpp (llama-cpp-python on the CPU, each file converted with llama.cpp's own converters): the
    uniform form and `trainer.save_model()`'s output give the trained logits; the same model saved with its scaling in
    alpha_pattern (as before issue 30) does not, as llama.cpp reads `lora_alpha` alone.

    Needs `llama_cpp` (llama-cpp-python built from its PyPI sdist), `sentencepiece` (the converter reads the base
    model's vocabulary from a `tokenizer.model`) and `LLAMA_CPP_DIR`, the llama.cpp source llama_cpp was built from
    (the sdist's `vendor/llama.cpp`, with its converters and `gguf-py`); skipped without them."""
    no_adapter = _relative(model_logits(tiny_llama_base()), run.logits)
    assert no_adapter > 1e-2, "the adapter changes the logits enough to tell a wrong scaling"
    uniform = export_adapter(run.compact, tmp_path / "uniform", form="uniform")
    assert _relative(real_llamacpp_logits(llamacpp, uniform, tmp_path), run.logits) < LLAMACPP_RTOL
    assert _relative(real_llamacpp_logits(llamacpp, run.saved, tmp_path), run.logits) < LLAMACPP_RTOL
    recorded = tmp_path / "recorded"
    PeftModel.save_pretrained(run.model, str(recorded))
    assert _relative(real_llamacpp_logits(llamacpp, recorded, tmp_path), run.logits) > 1e-2
