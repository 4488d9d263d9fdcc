"""Expanding a compact adapter into a plain PEFT adapter that any PEFT user can load without this package.

Every member of a shared group gets its own copy of the shared weights; a module whose LoRA was dropped (mode "drop")
gets B = 0, so it adds exactly nothing, and an A drawn as PEFT initialises it (from a fixed seed, so expanding twice
gives identical files), so the expanded adapter can still be fine-tuned.

Mode "truncate" needs no copies: the plain adapter keeps the reduced size. Each truncated module's LoRA is written at
its rank k as stored, and the config's `rank_pattern` gives those modules rank k (ahead of the user's own entries)
while loradrop's `alpha_pattern` entries, which scale a zero-padded rank-r module, are removed: PEFT then scales them
by `lora_alpha / k` (`/ sqrt(k)` with rsLoRA), which is `loradrop_trainer.truncate.rank_scaling`, the scaling they
trained with (the mode's `peft_config`, `hub_export.modes.truncate`).

Its logits equal the trained model's up to float32 rounding, not bit for bit: the trained model (and
`load_compact`) multiplies by a rank-r A and B whose rows and columns past k are zero, the expanded one by rank-k
matrices. The zeros add nothing exactly, but the product `x @ A^T` sums over the input features in an order the
kernel picks by the shape (k output columns or r), and float32 addition is not associative (on the CPU the rank-k A
product differs in the last bits, the rank-k B product does not); on the test model the logits differ by about 3e-7
of their largest value. `load_compact` is the exact route.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn
from transformers.utils import logging

from .atomic import Layout, atomic_directory, check_disjoint
from .base_model import warn_if_local
from .compact import config_text, read_compact, with_base
from .files import write_tensors
from .format import CompactAdapter
from .modes import export_mode
from .truncation import pad_to_rank

logger = logging.get_logger(__name__)

DROPPED_A_SEED = 0
PEFT_LAYOUT = Layout(
    "plain PEFT adapter", frozenset({CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME}), marker=SAFETENSORS_WEIGHTS_NAME
)


def expand_to_peft(
    compact_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str | None = None
) -> Path:
    """Write the plain PEFT adapter (adapter_config.json + adapter_model.safetensors) of `compact_dir` to `out_dir`.

    `PeftModel.from_pretrained(base, out_dir)` then gives the same logits as `load_compact(base, compact_dir)`, but
    the modules no longer share weights and the files are as large as an unpruned adapter's. In mode "truncate" the
    files keep the compact adapter's size (truncated modules at rank k through `rank_pattern`), and the logits agree
    up to float32 rounding (see the module docstring).

    Args:
        compact_dir: the compact adapter's local directory.
        out_dir: written atomically; it must lie outside `compact_dir` and be missing, empty or an earlier expansion
            (nothing but those two files).
        base_model: the base model's Hub id ("org/name"), recorded in adapter_config.json in place of the one the
            compact adapter names (see `hub_export.base_model`).
    """
    check_disjoint(compact_dir, out_dir)
    adapter = with_base(read_compact(compact_dir), base_model, near=compact_dir)
    warn_if_local(adapter.peft_config, f"The plain PEFT adapter in {out_dir}")
    with atomic_directory(out_dir, PEFT_LAYOUT) as staging:
        write_peft(adapter, staging)
    logger.info(f"LoRA-drop: plain PEFT adapter of {compact_dir} written to {out_dir}.")
    return Path(out_dir)


def write_peft(adapter: CompactAdapter, directory: Path) -> None:
    """Write the plain PEFT adapter of `adapter` into the existing, empty `directory`."""
    state = expanded_state_dict(adapter, padded=False)
    write_tensors(state, directory / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    config = export_mode(adapter.plan).peft_config(adapter.peft_config, adapter.plan)
    (directory / CONFIG_NAME).write_text(config_text(config), "utf-8")


def expanded_state_dict(adapter: CompactAdapter, *, padded: bool) -> dict[str, torch.Tensor]:
    """The adapter's full PEFT state dict: one tensor per PEFT key, none sharing memory (as safetensors requires).

    Args:
        adapter: a checked compact adapter.
        padded: give truncated modules (mode "truncate") their rank r again, zero past k, as the trained model holds
            them (`load_compact`); False keeps them at rank k, as a plain adapter with a `rank_pattern` holds them.
    """
    state = {}
    for source, keys in adapter.members.items():
        tensor, rank = adapter.tensors[source], adapter.full_ranks.get(source)
        for key in keys:
            state[key] = tensor.clone() if rank is None or not padded else pad_to_rank(key, tensor, rank)
    generator = torch.Generator().manual_seed(DROPPED_A_SEED)
    for key, spec in adapter.dropped.items():
        value = torch.zeros(spec.shape, dtype=torch.float32)
        if ".lora_A." in key:
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        state[key] = value.to(spec.torch_dtype)
    return state
