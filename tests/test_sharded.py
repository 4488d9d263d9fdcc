"""Sharded engines outside the 2-rank runs of test_distributed.py: what is refused, how the engine is read off the
Parameters, and the GPU benchmark's own checks at toy size on a CPU (DeepSpeed ZeRO-3, 2 ranks; slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TokenDataset, tiny_llama, tiny_llama_base, training_args
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from transformers import Trainer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from hub_export import load_compact, save_compact
from loradrop_trainer import DropPlan, LoraDropCallback, apply_plan, build_plan, find_lora_layers, lora_kinds
from loradrop_trainer.grad_tying import GradientTying
from loradrop_trainer.sharding import check_fsdp_version, full_numel, parameter_engine

ROOT = Path(__file__).resolve().parents[1]


def _plan(model) -> tuple[dict, DropPlan]:
    layers = find_lora_layers(model)
    importance = {name: float(i + 1) for i, name in enumerate(layers)}
    return layers, build_plan(importance, lora_kinds(layers), threshold=0.5)


def test_22_5_the_fsdp1_refusal_suggests_settings_transformers_takes_without_a_warning(tmp_path, caplog):
    """Issue 22, item 5: the refusal suggests FSDP2 as transformers 5 spells it (fsdp=True and fsdp_config), which
    TrainingArguments takes without the deprecation warning that fsdp='full_shard' gets."""
    import ast
    import re

    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="FSDP1") as err:
        check_fsdp_version({"version": 1}, tiny_llama())
    call = ast.parse(re.search(r"TrainingArguments\([^)]*\)", str(err.value))[0]).body[0].value
    suggested = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    assert suggested["fsdp"] is True and suggested["fsdp_config"]["version"] == 2
    with caplog.at_level("WARNING"):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], **suggested)
    assert "deprecated" not in caplog.text and args.fsdp_config["version"] == 2


def test_fsdp1_is_refused_and_fsdp2_is_not():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"FSDP1.*FSDP2"):
        check_fsdp_version({"version": 1}, model)
    check_fsdp_version({"version": 2}, model)
    check_fsdp_version({}, model)  # the Trainer's default version is 2
    check_fsdp_version(None, model)  # no FSDP at all


def test_replicated_lora_is_tied_in_place_not_by_gradient():
    model = tiny_llama()
    layers, plan = _plan(model)
    assert parameter_engine(p for n, p in model.named_parameters() if "lora_" in n) == "replicated"
    with pytest.raises(ValueError, match="not sharded"):
        GradientTying(layers, plan, torch.optim.AdamW(model.parameters()))


def test_zero3_partitions_are_recognised_counted_whole_and_never_tied_in_place():
    """A ZeRO-3 Parameter is an empty placeholder with `ds_id`/`ds_numel` (its partition lives in `ds_tensor`)."""
    model = tiny_llama()
    layers, plan = _plan(model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for index, param in enumerate(lora):
        param.ds_id, param.ds_numel = index, param.numel()
    assert parameter_engine(lora) == "zero3"
    assert full_numel(lora[0]) == lora[0].ds_numel
    with pytest.raises(ValueError, match="sharded"):
        apply_plan(layers, plan)
    del lora[0].ds_id
    with pytest.raises(ValueError, match="several ways"):
        parameter_engine(lora)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_the_sharded_gpu_benchmark_runs_zero3_at_toy_size_on_cpu(tmp_path):
    """benchmarks/sharded_gpu.py as the 2-GPU run launches it, at toy size: its own checks must all hold."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "benchmarks" / "sharded_gpu.py"), "--engine", "zero3", "--size", "tiny", "--seq_len", "32"]
    cmd += ["--out", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs"), "--base_dir", str(tmp_path / "base")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    results = tmp_path / "out" / "zero3.json"
    assert results.exists(), (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads(results.read_text())
    assert summary["resume_sha256_identical"] and summary["plain_lora_resume_sha256_identical"]
    runs = {run["run"]: run for run in summary["runs"]}
    pruned = runs["loradrop_0"]
    assert pruned["same_plan_on_every_rank"] and pruned["members_equal_at_switch"] and pruned["members_equal_at_end"]
    assert pruned["reload_lora_identical"] and runs["lora_0"]["reload_lora_identical"]
    assert runs["lora_0"]["reload_max_abs_logit_diff"] == 0.0  # the control: an unsharded copy of plain LoRA
    assert runs["lora_resumed"]["resume_max_abs_diff"] == runs["loradrop_resumed"]["resume_max_abs_diff"] == 0.0
    assert pruned["reload_logits_close"] and pruned["reload_max_abs_logit_diff"] == 0.0
    assert 0 < pruned["kept_modules"] < pruned["total_modules"]
    assert runs["loradrop_resumed"]["members_equal_at_end"]


def test_layers_wrapped_for_activation_checkpointing_keep_their_plain_names(tmp_path):
    """FSDP's activation checkpointing (CheckpointWrapper) puts `_checkpoint_wrapped_module.` in module names; plans
    and adapters must name modules as the base model does, so the export loads onto a fresh base."""
    model = tiny_llama()
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, LlamaDecoderLayer))
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    callback = LoraDropCallback(alpha=0.25)
    Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback]).train()
    assert not any("_checkpoint_wrapped_module" in name for name in callback.plan.kinds)
    save_compact(model, tmp_path / "compact")
    reloaded = load_compact(tiny_llama_base(), tmp_path / "compact")
    inputs = {"input_ids": torch.randint(1, 90, (2, 12))}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
