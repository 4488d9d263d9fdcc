"""Online importance: the squared norm of each LoRA module's output, summed over the real tokens of training batches.

The hooks sit on each `lora_B`, whose output is `B A dropout(x)`: multiplied by `scaling` it is exactly what the
module adds to the frozen layer. A pre-hook on the outer model marks which forwards count and captures the padding
mask once per forward, so that:

- evaluation and generation (eval mode or no grad) never count;
- the recomputation of activation checkpointing (reentrant or not), which happens during backward, outside the
  outer model's forward, never counts twice;
- every micro-batch of gradient accumulation counts once.

Nothing in a hook reads a value back to the host: each module adds into its own float32 scalar on its device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

_MASK_KEYS = ("attention_mask", "decoder_attention_mask")


class ImportanceCollector:
    """Accumulates `sum ||scaling * B A x||^2` over the non-padding tokens of training forwards, per LoRA module."""

    def __init__(
        self, model: nn.Module, layers: Mapping[str, LoraLayer], adapter_name: str = "default", score_every: int = 1
    ) -> None:
        self.names = list(layers)
        self._score_every = score_every
        self._forwards = 0
        self._active = False
        self._masks: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}
        self._raw_masks: dict[torch.Size, torch.Tensor] = {}
        self._totals: list[torch.Tensor] = []
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
            model.register_forward_hook(self._end_forward, always_call=True),
        ]
        for layer in layers.values():
            lora_b = layer.lora_B[adapter_name]
            total = torch.zeros((), dtype=torch.float32, device=lora_b.weight.device)
            self._totals.append(total)
            self._handles.append(lora_b.register_forward_hook(self._scorer(total, float(layer.scaling[adapter_name]))))

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self._forwards += 1
        if (self._forwards - 1) % self._score_every:
            return
        self._active = True
        for key in _MASK_KEYS:
            mask = kwargs.get(key)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self._raw_masks[mask.shape] = mask

    def _end_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        self._active = False
        self._masks.clear()
        self._raw_masks.clear()

    def _mask_for(self, out: torch.Tensor) -> torch.Tensor | None:
        """The padding mask of `out`'s (batch, sequence) shape, shaped to broadcast over features, or None."""
        key = (out.shape[:-1], out.dtype)
        mask = self._masks.get(key)
        if mask is None:
            raw = self._raw_masks.get(out.shape[:-1])
            if raw is None:
                return None
            mask = self._masks[key] = raw.to(device=out.device, dtype=out.dtype).unsqueeze(-1)
        return mask

    def _scorer(self, total: torch.Tensor, scaling: float):
        squared_scaling = scaling * scaling

        def score(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not self._active:
                return
            with torch.no_grad():
                mask = self._mask_for(out)
                if mask is not None:
                    out = out * mask
                norm = torch.linalg.vector_norm(out, dtype=torch.float32)
                total.addcmul_(norm, norm, value=squared_scaling)

        return score

    def totals(self) -> dict[str, float]:
        """This process's totals so far (reads them back to the host)."""
        return dict(zip(self.names, torch.stack([t.to(self._totals[0].device) for t in self._totals]).tolist()))

    def load_totals(self, totals: Mapping[str, float]) -> None:
        """Continue from totals saved in a checkpoint."""
        with torch.no_grad():
            for name, total in zip(self.names, self._totals):
                total.fill_(float(totals.get(name, 0.0)))

    def all_reduce(self, device: torch.device) -> None:
        """Sum the totals of every process into every process (no-op in a single process)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        stacked = torch.stack([t.to(device) for t in self._totals])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        with torch.no_grad():
            for total, value in zip(self._totals, stacked):
                total.copy_(value)

    def zero(self) -> None:
        """Forget this process's totals (after an all-reduce left their sum on another rank)."""
        with torch.no_grad():
            for total in self._totals:
                total.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False
