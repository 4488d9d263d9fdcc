"""Adapter files for the engines users serve with: each form computes the trained model wherever it claims to.

A LoRA-drop adapter in mode "truncate" holds modules of two ranks, each scaled as PEFT scales its own rank, and the
plain PEFT adapter `expand_to_peft` writes says so through `rank_pattern` (the "peft" form, the smallest). PEFT reads
that field; vLLM's adapter config (`vllm/lora/peft_helper.py`) has neither `rank_pattern` nor `alpha_pattern` and
scales every module by one `lora_alpha / r`, and llama.cpp's converter (`convert_lora_to_gguf.py`) reads `lora_alpha`
alone and scales each tensor by `alpha / (its rank)`, ignoring `use_rslora`. So an adapter every engine serves as
trained must need none of those fields:

- "uniform": every LoRA module at one rank R (the largest of the adapter; truncated and lower-rank modules zero-padded),
  each module's own scaling `s` folded into its `lora_B` as `s / (lora_alpha / R)`, and a config with `r=R`, no
  `rank_pattern`, no `alpha_pattern` and `use_rslora` off. One `lora_alpha / R` is then right for every module under
  every rule above. In PEFT it gives the trained logits bit for bit when the folded factors are powers of two (the
  default: r=8 truncated to rank 1 folds 8) and to float32 rounding otherwise; it is as large as the unpruned adapter.
- "vllm": the uniform form, refused in one line where vLLM would refuse it or compute something else
  (`modules_to_save`, a rank above vLLM's largest `max_lora_rank`).
- "merged": the base model with the adapter merged in (`merge_and_unload` of the exactly loaded adapter), for engines
  and users that take full weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn
from transformers.utils import logging

from loradrop_trainer.peft_keys import LORA_SUFFIXES
from loradrop_trainer.truncate import scaling_at_rank

from .atomic import Layout, atomic_directory, check_disjoint, check_replaceable
from .base_model import warn_if_local
from .compact import config_text, read_compact, with_base
from .errors import CompactFormatError
from .expand import PEFT_LAYOUT, expanded_state_dict, write_peft
from .files import write_tensors
from .format import CompactAdapter
from .forms import FORMS, VLLM_MAX_RANKS
from .model_card import AUTO_CLASSES
from .truncation import module_value, pad_to_rank, rank_axis

logger = logging.get_logger(__name__)

MERGED_LAYOUT = Layout(
    "merged model",
    frozenset({"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}),
    marker="config.json",
)


def export_adapter(
    compact_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    form: str = "uniform",
    base_model: str | None = None,
    base: nn.Module | str | os.PathLike | None = None,
) -> Path:
    """Write the adapter of `compact_dir` to `out_dir` in the form an engine serves as trained; return `out_dir`.

    Everything is checked (the compact adapter as untrusted input, the form against the adapter) before anything is
    written, and the output appears atomically.

    Args:
        compact_dir: a compact adapter directory (or a pulled Hub repo).
        out_dir: missing, empty or an earlier output of the same form; outside `compact_dir`.
        form: "peft" (rank_pattern, smallest; PEFT and llama.cpp), "uniform" (any engine that loads plain LoRA),
            "vllm" (uniform, with vLLM's limits checked) or "merged" (full weights; needs `base`).
        base_model: the base model's Hub id ("org/name"), recorded in adapter_config.json in place of the one the
            compact adapter names (see `hub_export.base_model`).
        base: form "merged" only: the base model, as `load_compact` takes it (it is modified in place), or the local
            directory of its weights, loaded with the transformers class of the adapter's task once every check
            passed.
    """
    if form not in FORMS:
        raise ValueError(f"Unknown form {form!r}; choose one of {', '.join(FORMS)}.")
    if (form == "merged") != (base is not None):
        raise ValueError("Pass base= (the base model to merge into) for form 'merged', and only for it.")
    if form == "merged" and base_model is not None:
        raise ValueError("base_model names the base in an adapter's config; a merged model has none: leave it out.")
    check_disjoint(compact_dir, out_dir)
    if form == "merged":
        check_replaceable(Path(out_dir).absolute(), MERGED_LAYOUT)
        return _write_merged(compact_dir, out_dir, base)
    adapter = with_base(read_compact(compact_dir), base_model, near=compact_dir)
    if form != "peft":
        check_form(adapter, form, f"the compact adapter at {compact_dir}")
    warn_if_local(adapter.peft_config, f"The adapter in {out_dir}")
    with atomic_directory(out_dir, PEFT_LAYOUT) as staging:
        (write_peft if form == "peft" else write_uniform)(adapter, staging)
    logger.info(f"LoRA-drop: {form} adapter of {compact_dir} written to {out_dir}.")
    return Path(out_dir)


def check_form(adapter: CompactAdapter, form: str, where: str) -> None:
    """Refuse, in one line, an adapter the form cannot carry as trained (`export_adapter`'s forms)."""
    config = adapter.peft_config
    if form == "vllm" and config.get("modules_to_save"):
        raise CompactFormatError(
            f"{where} trains {config['modules_to_save']} in full (modules_to_save), which vLLM refuses "
            "(vllm/lora/peft_helper.py); serve it with PEFT, or export --for merged."
        )
    rank = adapter.uniform_rank
    if form == "vllm" and rank > VLLM_MAX_RANKS[-1]:
        raise CompactFormatError(
            f"{where} has LoRA rank {rank}, above {VLLM_MAX_RANKS[-1]}, the largest max_lora_rank vLLM accepts; "
            "serve it with PEFT, or export --for merged."
        )
    if config["lora_alpha"] == 0 and any(module_scalings(adapter).values()):
        raise CompactFormatError(
            f"{where} has lora_alpha 0 but modules scaled otherwise (alpha_pattern): a single lora_alpha / r of 0 "
            "cannot carry their scaling; export --for peft."
        )


def module_scalings(adapter: CompactAdapter) -> dict[str, float]:
    """`{module: scaling}`: what PEFT multiplies each LoRA module's output by when it loads the adapter at its trained
    ranks (the compact adapter's config, whose `alpha_pattern` scales a truncated module as a rank-k LoRA), which is
    what the trained model multiplied it by."""
    config = adapter.peft_config
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    return {
        name: scaling_at_rank(
            module_value(config["lora_alpha"], alpha_pattern, name),
            module_value(config["r"], rank_pattern, name),
            rslora,
        )
        for name in adapter.lora_modules
    }


def uniform_state_dict(adapter: CompactAdapter) -> dict[str, torch.Tensor]:
    """The uniform form's weights: every LoRA weight at rank `uniform_rank` (zero-padded), each `lora_B` multiplied
    by its module's scaling over `lora_alpha / R`; other weights (`modules_to_save`) as they are."""
    rank = adapter.uniform_rank
    common = scaling_at_rank(adapter.peft_config["lora_alpha"], rank, False)
    scalings = module_scalings(adapter)
    state = expanded_state_dict(adapter, padded=True)
    for key, tensor in state.items():
        suffix = next((suffix for suffix in LORA_SUFFIXES if key.endswith(suffix)), None)
        if suffix is None:
            continue
        padded = tensor if tensor.shape[rank_axis(key)] == rank else pad_to_rank(key, tensor, rank)
        if suffix == LORA_SUFFIXES[1] and common:  # lora_alpha 0 scales every module by 0 (`check_form`)
            factor = scalings[key.removesuffix(suffix)] / common
            padded = padded if factor == 1 else padded * factor
        state[key] = padded
    return state


def uniform_config(peft_config: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """The uniform form's PEFT config: rank `rank` for every module and nothing that scales one module otherwise."""
    return {**peft_config, "r": rank, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}


def write_uniform(adapter: CompactAdapter, directory: Path) -> None:
    """Write the uniform form of `adapter` into the existing, empty `directory`."""
    write_tensors(uniform_state_dict(adapter), directory / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    config = uniform_config(adapter.peft_config, adapter.uniform_rank)
    (directory / CONFIG_NAME).write_text(config_text(config), "utf-8")


def _write_merged(
    compact_dir: str | os.PathLike, out_dir: str | os.PathLike, base: nn.Module | str | os.PathLike
) -> Path:
    """The base model with the compact adapter merged in, saved with `save_pretrained`."""
    from .loader import load_compact

    if not isinstance(base, nn.Module):
        base = load_base(base, read_compact(compact_dir).peft_config.get("task_type"))
    merged = load_compact(base, compact_dir).merge_and_unload()
    with atomic_directory(out_dir, MERGED_LAYOUT) as staging:
        merged.save_pretrained(staging)
    logger.info(f"LoRA-drop: {compact_dir} merged into its base model, written to {out_dir}.")
    return Path(out_dir)


def load_base(directory: str | os.PathLike, task_type: str | None) -> nn.Module:
    """The base model in the local `directory`, loaded with the transformers class of `task_type` (`AutoModel`
    without one); nothing is downloaded and no code of the directory runs.

    Args:
        directory: a local directory of the base model's weights and config.
        task_type: PEFT's task type of the adapter ("CAUSAL_LM", ...).
    """
    import transformers

    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; pass the base model's local directory.")
    auto = getattr(transformers, AUTO_CLASSES.get(str(task_type), "AutoModel"))
    return auto.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
