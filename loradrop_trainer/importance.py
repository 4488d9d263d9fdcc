"""Online importance: how much each LoRA module changes its layer's output, over the real tokens of training batches.

A LoRA module adds `scaling * B u` to its layer, where `u = A dropout(x)` is the r-dimensional input of `lora_B`.
Its squared norm over the tokens t with mask m_t is

    scaling^2 * sum_t m_t ||B u_t||^2 = scaling^2 * <B^T B, U^T M U>,

two r x r matrices. So each `lora_B` only passes on a reference to `u` (which autograd keeps for B's gradient
anyway), and at the end of the outer model's forward all modules are scored together with a handful of batched
matrix products, instead of a few kernels and a Python call per module at full width. `lora_B` passes `u` on from
a wrapper of its `forward` (an instance attribute, taken off again by `remove`), not from a forward pre-hook: a
module with a hook runs through `nn.Module`'s slow call path, which at 224 modules made the collection cost the host
twice as much (5.7 against 3.0 ms a step on a 2-core CPU; `benchmarks/overhead.py`, variant `collect_prehooks`),
and a Llama-2-7B step of 4 x 512 tokens on an H200 is the host's. A pre-hook on the outer model marks which forwards
count and captures the padding mask once per forward, so that:

- evaluation and generation (eval mode or no grad) never count;
- the recomputation of activation checkpointing (reentrant or not), which happens during backward, outside the
  outer model's forward, never counts twice;
- every micro-batch of gradient accumulation counts once.

What one scored forward contributes, per module (`score`):

- "output" (the paper): the squared norm above.
- "relative": that norm divided by the squared norm of the frozen layer's own output on the same tokens,
  `||scaling B A x||^2 / ||W0 x||^2`: how much LoRA changes the layer rather than how large the layer's output is.
  Decoders with massive activations at a few layers' inputs have LoRA outputs there that dwarf every other module's
  in absolute terms; relative to their layer's output they are ordinary. The frozen output's norm comes from a
  forward hook on each `base_layer` that reduces the output to one number per token, on scored forwards only.

- "residual": what truncation to rank k would take away, `||scaling (B A - [B A]_k) x||^2`, where `[B A]_k` is the
  best rank-k approximation mode "truncate" keeps (SVD). With `u = A x` it is `scaling^2 <B_res^T B_res, U^T M U>`,
  `B_res = (I - P_k) B` and `P_k` the projection on the top k left singular vectors of `B A`: so the collector sums
  each module's r x r token Gram `U^T M U` over the scored forwards (as cheap as "output": the Gram is computed for
  it anyway) and `residual_totals` reads the score out at the switch, from the Gram and the weights then. The Gram
  sums inputs `A x` of every scored step while the score uses the last `A` and `B`: exact for a fixed `A`, an
  approximation as far as `A` moved during the collection (not measured). A module whose update is nearly rank k
  scores near zero even when its output is large, and is the one to truncate. With `truncation="activation"`,
  `[B A]_k` is the truncation that minimises this residual (`truncate.kept_directions`), and the score is what it
  leaves.

The same Grams, summed for any score when `input_grams` is set, are what `truncation="activation"` truncates by.

How forwards add up (`aggregate`):

- "sum" (the paper): the scores are summed over the scored forwards.
- "rank": each scored forward ranks the modules (0 for the least important, ties share their mean rank) and the
  ranks are summed (Borda points). Every forward then carries the same weight, so no single batch can dominate,
  and a module's share of the total is bounded by about 2 / (number of modules), whatever its magnitude.

Nothing reads a value back to the host during training: scores are added into a float32 vector on the device. A
score that is not finite (one overflowing micro-batch of one module) is left out and counted instead of poisoning the
module's total; the count is reported at the switch. So is how much data the plan rests on (`scored`): the scored
micro-batches and their real tokens (the attention mask's, or every input token when there is none), counted on the
device as well.

When the LoRA weights are sharded (FSDP2, DeepSpeed ZeRO-3), a `lora_B` weight is whole only inside its module's
forward, so the wrapper computes `B^T B` right there (an r x r matrix, in float32) instead of reading B at the end.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from types import MethodType

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import AGGREGATES, SCORES
from .plan import SCORED_KEYS
from .sharding import parameter_engine, whole_tensors
from .truncate import kept_directions

_MASK_KEYS = ("attention_mask", "decoder_attention_mask")


class ImportanceCollector:
    """Accumulates each LoRA module's importance over the non-padding tokens of training forwards.

    Args:
        model: the outer model whose forward is one micro-batch (the PeftModel).
        layers: `{name: LoRA layer}` to score, as `find_lora_layers` returns them.
        adapter_name: the adapter whose LoRA is scored.
        score_every: score one training forward in every `score_every`.
        score: what one forward measures per module, "output", "relative" or "residual" (see the module docstring).
        aggregate: how forwards add up, "sum" or "rank" (see the module docstring).
        input_grams: also sum each module's token Gram for any `score` (`LoraDropConfig(truncation="activation")`
            truncates with it); score "residual" always does.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, LoraLayer],
        adapter_name: str = "default",
        score_every: int = 1,
        score: str = "output",
        aggregate: str = "sum",
        input_grams: bool = False,
    ) -> None:
        if score not in SCORES or aggregate not in AGGREGATES:
            raise ValueError(f"score must be one of {SCORES} and aggregate one of {AGGREGATES}.")
        self.names = list(layers)
        self._lora_b = [layer.lora_B[adapter_name] for layer in layers.values()]
        device = self._lora_b[0].weight.device
        self._totals = torch.zeros(len(self.names), dtype=torch.float32, device=device)
        self._skipped = torch.zeros_like(self._totals)
        self._scored = torch.zeros(2, dtype=torch.int64, device=device)  # scored micro-batches, their real tokens
        self._tokens: torch.Tensor | int = 0  # real tokens of the forward being scored
        self._scored_known = True  # False after resuming totals saved without their counts
        self._squared_scaling = torch.tensor(
            [float(layer.scaling[adapter_name]) ** 2 for layer in layers.values()], device=device
        )
        self._score_every = score_every
        self._relative = score == "relative"
        self._grams = None  # each module's token Gram, zero-padded to the largest rank ("residual", input_grams)
        if score == "residual" or input_grams:
            rank = max(layer.r[adapter_name] for layer in layers.values())
            self._grams = torch.zeros(len(self.names), rank, rank, device=device)
        self._rank = aggregate == "rank"
        self._gram_in_hook = parameter_engine(b.weight for b in self._lora_b) != "replicated"
        self._forwards = 0
        self._active = False
        self._inputs: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self._base_norms: list[tuple[int, torch.Tensor]] = []
        self._masks: dict[torch.Size, torch.Tensor] = {}
        self._indices: dict[tuple[int, ...], tuple[torch.Tensor, list[tuple[torch.Tensor, list[int]]]]] = {}
        self._model = model
        self._base_layers = [layer.base_layer for layer in layers.values()]
        self._handles: list[RemovableHandle] = []
        self._wrapped: list[tuple[nn.Module, MethodType, Callable | None]] = []
        self._attachment = 0  # counts removals, so that a wrapper `remove` had to leave in place records nothing
        self.attach()

    def attach(self) -> None:
        """Install the hooks and wrappers (done on construction; again after `remove`, the totals so far kept)."""
        if self._handles:
            return
        self._handles = [
            self._model.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
            self._model.register_forward_hook(self._end_forward, always_call=True),
        ]
        self._record_inputs()
        if self._relative:
            for index, base_layer in enumerate(self._base_layers):
                self._handles.append(base_layer.register_forward_hook(self._base_recorder(index)))

    def _record_inputs(self) -> None:
        """Have every `lora_B` pass its input on (`_recording_forward`)."""
        for index, lora_b in enumerate(self._lora_b):
            previous = lora_b.__dict__.get("forward")
            recording = self._recording_forward(index, lora_b, previous)
            lora_b.forward = recording
            self._wrapped.append((lora_b, recording, previous))

    def skip_forwards(self, count: int) -> None:
        """Continue `score_every`'s count after `count` training forwards (resuming), so the same ones are scored."""
        self._forwards = count

    def _recording_forward(self, index: int, lora_b: nn.Module, previous: Callable | None) -> MethodType:
        """`lora_b.forward`, passing its input `u` on to this collector first.

        Bound to `lora_b` as a method, so that a `copy.deepcopy` of the model calls the copy's own weights. `previous`
        is an instance `forward` another library had set (accelerate's hooks do), called in its place. A wrapper of
        an earlier attachment that something else wrapped in turn (so `remove` could not take it off) stays inert.
        """
        attachment = self._attachment

        def record_and_forward(module: nn.Module, u: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self._active and attachment == self._attachment:
                self._inputs.append((index, u, _weight_gram(module.weight) if self._gram_in_hook else None))
            if previous is not None:
                return previous(u, *args, **kwargs)
            return type(module).forward(module, u, *args, **kwargs)

        return MethodType(record_and_forward, lora_b)

    def _base_recorder(self, index: int):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._active:  # one value per token; the padding mask is applied with all modules at once
                self._base_norms.append((index, torch.linalg.vector_norm(output.detach(), dim=-1, dtype=torch.float32)))

        return record

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self._forwards += 1
        if (self._forwards - 1) % self._score_every:
            return
        self._active = True
        self._tokens = _real_tokens(args, kwargs)
        for key in _MASK_KEYS:
            mask = kwargs.get(key)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self._masks[mask.shape] = mask

    def _end_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        try:
            if self._active and self._inputs:
                with torch.no_grad(), torch.autocast(self._totals.device.type, enabled=False):
                    self._score()
        finally:
            self._active = False
            self._inputs.clear()
            self._base_norms.clear()
            self._masks.clear()

    def _score(self) -> None:
        grams = torch.zeros_like(self._grams) if self._grams is not None else None
        scores = self._output_norms(grams)
        if self._relative:
            scores = scores / self._base_output_norms().clamp_min(torch.finfo(torch.float32).tiny)
        finite = torch.isfinite(scores)
        self._skipped += (~finite).float()
        if grams is not None:
            self._grams += torch.where(finite.reshape(-1, 1, 1), grams, 0.0)
        scores = torch.where(finite, scores, 0.0)
        if self._rank:  # a forward in which every score is zero (B still zero) ranks nothing
            scores = mid_ranks(scores) * (scores.amax() > 0)
        self._totals += scores
        self._scored[0] += 1
        self._scored[1] += self._tokens.to(self._scored) if isinstance(self._tokens, torch.Tensor) else self._tokens

    def _output_norms(self, grams: torch.Tensor | None = None) -> torch.Tensor:
        """`scaling^2 sum_t m_t ||B u_t||^2` of this forward, per module (zero for modules it did not run); the token
        Grams `sum_t m_t u_t u_t^T` are added into `grams` (modules x r x r, zero-padded) when it is given."""
        out = torch.zeros_like(self._totals)
        groups: dict[tuple[torch.Size, torch.device], list[tuple[int, torch.Tensor, torch.Tensor | None]]]
        groups = defaultdict(list)
        for item in self._inputs:
            groups[(item[1].shape, item[1].device)].append(item)
        for (shape, device), items in groups.items():
            targets, by_b_shape = self._group_indices(tuple(index for index, _, _ in items), device)
            u = torch.stack([u for _, u, _ in items]).reshape(len(items), -1, shape[-1]).float()
            mask = self._masks.get(shape[:-1])
            masked = u * mask.reshape(1, -1, 1).to(u) if mask is not None else u
            token_gram = torch.bmm(masked.transpose(1, 2), u)
            if grams is not None:
                rank = shape[-1]
                grams[:, :rank, :rank].index_add_(0, targets.to(grams.device), token_gram.to(grams.device))
            if self._gram_in_hook:
                weight_gram = torch.stack([gram for _, _, gram in items]).to(device)
            else:
                weight_gram = torch.empty_like(token_gram)
                for positions, weights in by_b_shape:
                    b = torch.stack([self._lora_b[i].weight for i in weights]).to(device=device, dtype=torch.float32)
                    weight_gram[positions] = torch.bmm(b.transpose(1, 2), b)
            scores = (token_gram * weight_gram).sum(dim=(1, 2))
            out.index_add_(0, targets, scores.to(out.device) * self._squared_scaling[targets])
        return out

    def _base_output_norms(self) -> torch.Tensor:
        """`sum_t m_t ||W0 x_t||^2` of this forward, per module (zero for modules it did not run)."""
        out = torch.zeros_like(self._totals)
        groups: dict[tuple[torch.Size, torch.device], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for index, norms in self._base_norms:
            groups[(norms.shape, norms.device)].append((index, norms))
        for (shape, device), items in groups.items():
            targets, _ = self._group_indices(tuple(index for index, _ in items), device)
            squared = torch.stack([norms for _, norms in items]).reshape(len(items), -1).square()
            mask = self._masks.get(shape)
            if mask is not None:
                squared = squared * mask.reshape(1, -1).to(squared)
            out.index_add_(0, targets, squared.sum(dim=1).to(out.device))
        return out

    def _group_indices(self, indices: tuple[int, ...], device: torch.device):
        """Index tensors for one group of modules, built once: the same modules come together every forward."""
        cached = self._indices.get(indices)
        if cached is None:
            by_shape: dict[torch.Size, list[int]] = defaultdict(list)
            for position, index in enumerate(indices):
                by_shape[self._lora_b[index].weight.shape].append(position)
            cached = self._indices[indices] = (
                torch.tensor(indices, device=self._totals.device),
                [
                    (torch.tensor(positions, device=device), [indices[p] for p in positions])
                    for positions in by_shape.values()
                ],
            )
        return cached

    def totals(self) -> dict[str, float]:
        """This process's totals so far (reads them back to the host)."""
        return dict(zip(self.names, self._totals.tolist()))

    def residual_totals(
        self, layers: Mapping[str, LoraLayer], adapter_name: str, rank: int, activation: bool = False
    ) -> dict[str, float]:
        """Score "residual": each module's `scaling^2 sum_t ||(B A - [B A]_rank) x_t||^2` from the summed token Grams
        and the module's weights now (gathered when sharded: every rank must call it, after `all_reduce`).

        Args:
            layers: `{name: LoRA layer}`, the layers this collector scores.
            adapter_name: the adapter whose LoRA is scored.
            rank: the rank mode "truncate" would cut a module to (`dropped_rank`).
            activation: `[B A]_rank` is the activation-aware truncation (`truncation="activation"`), not the SVD.
        """
        if self._grams is None:
            raise ValueError("residual_totals needs a collector made with score='residual'.")
        modules = [layers[name] for name in self.names]
        params = [p for m in modules for p in (m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight)]
        whole = whole_tensors(params)
        grams = self._grams.to(torch.float64).cpu()
        return {
            name: truncation_residual(
                whole[2 * i], whole[2 * i + 1], grams[i], rank, float(m.scaling[adapter_name]), activation
            )
            for i, (name, m) in enumerate(zip(self.names, modules))
        }

    def grams(self) -> dict[str, list[float]] | None:
        """This process's token Grams so far, per module, row by row, for a checkpoint (None when it sums none)."""
        if self._grams is None:
            return None
        return {name: gram.flatten().tolist() for name, gram in zip(self.names, self._grams.cpu())}

    def input_grams(self) -> dict[str, torch.Tensor]:
        """`{module name: the r x r token Gram of its lora_B's inputs}` (float64, on the CPU; zero-padded to the
        largest rank), for `truncate.truncated_dropped_values` (after `all_reduce`: the same on every rank)."""
        if self._grams is None:
            raise ValueError("input_grams needs a collector made with input_grams=True or score='residual'.")
        return dict(zip(self.names, self._grams.to(torch.float64).cpu()))

    def skipped(self) -> dict[str, int]:
        """How many scores of each module were left out for not being finite (modules with none are omitted)."""
        return {name: int(n) for name, n in zip(self.names, self._skipped.tolist()) if n}

    def scored(self) -> dict[str, int] | None:
        """How much data this process's totals rest on, `{"micro_batches": n, "tokens": n}` (reads them back); None
        when they continue totals of a checkpoint that did not record it."""
        return dict(zip(SCORED_KEYS, self._scored.tolist())) if self._scored_known else None

    def load_totals(
        self,
        totals: Mapping[str, float],
        skipped: Mapping[str, int] | None = None,
        scored: Mapping[str, int] | None = None,
        grams: Mapping[str, list[float]] | None = None,
    ) -> None:
        """Continue from the totals (and counts of left-out scores and of scored data, and score "residual"'s token
        Grams) saved in a checkpoint."""
        for tensor, saved in ((self._totals, totals), (self._skipped, skipped or {})):
            values = [float(saved.get(name, 0.0)) for name in self.names]
            tensor.copy_(torch.tensor(values, dtype=torch.float32))
        if self._grams is not None:
            size = self._grams.shape[1:].numel()
            values = [(grams or {}).get(name) or [0.0] * size for name in self.names]
            if any(len(value) != size for value in values):
                raise ValueError(
                    f"The checkpoint's LoRA-drop token Grams do not fit this model's LoRA ranks ({size} values a "
                    "module expected): resume with the adapter the checkpoint was trained with."
                )
            self._grams.copy_(torch.tensor(values, dtype=torch.float32).reshape(self._grams.shape))
        self._scored_known = scored is not None
        counts = [int((scored or {}).get(key, 0)) for key in SCORED_KEYS]
        self._scored.copy_(torch.tensor(counts, dtype=torch.int64))

    def all_reduce(self, device: torch.device) -> None:
        """Sum the totals of every process into every process (no-op in a single process)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        summed = torch.stack([self._totals, self._skipped]).to(device)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        self._totals.copy_(summed[0])
        self._skipped.copy_(summed[1])
        if self._grams is not None:
            grams = self._grams.to(device)
            dist.all_reduce(grams, op=dist.ReduceOp.SUM)
            self._grams.copy_(grams)
        scored = self._scored.to(device)  # integers: a float32 count of tokens would round past 2**24
        dist.all_reduce(scored, op=dist.ReduceOp.SUM)
        self._scored.copy_(scored)

    def zero(self) -> None:
        """Forget this process's totals (after an all-reduce left their sum on another rank)."""
        self._totals.zero_()
        self._skipped.zero_()
        self._scored.zero_()
        if self._grams is not None:
            self._grams.zero_()

    def remove(self) -> None:
        """Take the hooks and wrappers off the model (the totals stay readable; `attach` puts them back)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for lora_b, recording, previous in self._wrapped:
            if lora_b.__dict__.get("forward") is recording:  # else wrapped in turn: left in place, inert
                if previous is None:
                    del lora_b.forward
                else:
                    lora_b.forward = previous
        self._wrapped.clear()
        self._attachment += 1
        self._active = False
        self._inputs.clear()
        self._base_norms.clear()


def _real_tokens(args: tuple, kwargs: dict) -> torch.Tensor | int:
    """The real tokens of a forward's input: the attention mask's count (left on the device), else every input
    token."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.sum()
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    return embeds.shape[:-1].numel() if isinstance(embeds, torch.Tensor) and embeds.dim() == 3 else 0


def _weight_gram(weight: torch.Tensor) -> torch.Tensor:
    """`B^T B` in float32, for a weight that is whole only now (inside its module's forward)."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        b = weight.float()
        return b.T @ b


def truncation_residual(
    a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor, rank: int, scaling: float, activation: bool = False
) -> float:
    """`scaling^2 sum_t ||(B A - [B A]_rank) x_t||^2` given `gram = sum_t (A x_t)(A x_t)^T`: what cutting this LoRA to
    rank `rank` (as mode "truncate" does) would take from its output on those inputs.

    `[B A]_rank = P B A`, with `P` the projection on the `rank` output directions the truncation keeps
    (`truncate.kept_directions`: the top left singular vectors of `B A`, or with `activation` those of `B A X`, for
    which this residual is the least any rank-`rank` matrix leaves); the residual is then `(I - P) B u` with `u = A x`,
    and its energy `<B_res^T B_res, gram>`. Computed in float64.

    Args:
        a: `lora_A` weight, shape (r, in_features).
        b: `lora_B` weight, shape (out_features, r).
        gram: the r x r token Gram of `lora_B`'s inputs (a larger zero-padded one is cut to r x r).
        rank: the rank the truncation keeps.
        scaling: the module's LoRA scaling during the collection.
        activation: the truncation is `LoraDropConfig(truncation="activation")`'s, not the SVD.
    """
    r = a.shape[0]
    a64, b64 = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    if rank >= r:
        return 0.0
    gram64 = gram[:r, :r].to(torch.float64)
    left = kept_directions(a64, b64, rank, gram64 if activation else None)
    residual = b64 - left @ (left.T @ b64)
    energy = (residual.T @ residual * gram64).sum()
    return float(energy) * scaling**2


def mid_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each score among all of them, 0 for the smallest; tied scores share the mean of their ranks.

    Computed by comparing every pair on the device (n is the number of LoRA modules, a few hundred at most), so it
    needs no sort and no host sync, and the result does not depend on the order the modules are listed in.
    """
    below = (scores.unsqueeze(0) < scores.unsqueeze(1)).sum(dim=1)
    equal = (scores.unsqueeze(0) == scores.unsqueeze(1)).sum(dim=1)
    return below.to(scores.dtype) + (equal.to(scores.dtype) - 1) / 2
