"""Finding the PEFT LoRA modules LoRA-drop works on, and naming their kinds."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .sharding import full_numel, unwrapped_name


def find_lora_layers(
    model: nn.Module,
    adapter_name: str = "default",
    target: list[str] | None = None,
    exclude: list[str] | None = None,
) -> dict[str, LoraLayer]:
    """Return `{module name: LoRA layer}` for every plain LoRA layer of `adapter_name`, in model order.

    Raises with an actionable message when there is nothing to prune or when a layer uses a LoRA variant whose
    output is not `scaling * B(A(dropout(x)))` (DoRA, embeddings, ...): its importance would not mean what the
    paper's does, and sharing its weights would not be a LoRA-drop re-parameterisation.
    """
    layers: dict[str, LoraLayer] = {}
    unsupported: list[str] = []
    for name, module in named_modules(model):
        if not isinstance(module, LoraLayer):
            continue
        if target is not None and not any(t in name for t in target):
            continue
        if exclude is not None and any(e in name for e in exclude):
            continue
        if adapter_name not in module.lora_A:
            if adapter_name in getattr(module, "lora_embedding_A", {}):
                unsupported.append(f"{name} (LoRA on an embedding)")
            continue
        if module.lora_variant.get(adapter_name) is not None:
            variant = type(module.lora_variant[adapter_name]).__name__
            unsupported.append(f"{name} ({variant})")
            continue
        if not isinstance(module.lora_A[adapter_name], nn.Linear):
            unsupported.append(f"{name} ({type(module.lora_A[adapter_name]).__name__} LoRA)")
            continue
        if module.lora_B[adapter_name].bias is not None:
            unsupported.append(f"{name} (lora_bias)")
            continue
        layers[name] = module
    if unsupported:
        shown = ", ".join(unsupported[:5]) + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
        raise ValueError(
            f"LoRA-drop supports plain LoRA on linear layers; adapter {adapter_name!r} has unsupported modules: "
            f"{shown}. Train without DoRA, lora_bias or embedding/conv LoRA on these, or leave them out with "
            "LoraDropConfig(exclude=[...])."
        )
    if not layers:
        found = sorted({a for m in model.modules() if isinstance(m, LoraLayer) for a in m.lora_A})
        hint = f"the model has LoRA adapters {found}" if found else "the model has no PEFT LoRA modules at all"
        raise ValueError(
            f"No LoRA module of adapter {adapter_name!r} matches (target={target}, exclude={exclude}); {hint}. "
            "Wrap the model with peft.get_peft_model(model, LoraConfig(...)) before building the Trainer, and set "
            "LoraDropConfig(adapter_name=...) to the adapter you train."
        )
    return layers


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` under the names of the unwrapped model (`unwrapped_name`), so that plans and exported
    adapters name modules as the base model does, whatever engine trained it."""
    for name, module in model.named_modules():
        yield unwrapped_name(name), module


def lora_kinds(layers: dict[str, LoraLayer], adapter_name: str = "default") -> dict[str, str]:
    """Map each module name to its kind: what the module is within a block, shortest name first.

    The kind is the module's own name (`v_proj`) when that is unambiguous; when one leaf name has several roles
    (BERT's `dense` is `attention.output.dense`, `intermediate.dense` and `output.dense`) it is the path below the
    layer index. A model with several stacks of layers (T5's and BART's encoder and decoder) gets the stack's name in
    front (`encoder.self_attn.q_proj`, `decoder.self_attn.q_proj`): the paper prunes each stack's modules as their own
    kinds, and an encoder's query projection has another job than a decoder's. Modules of one kind can share a LoRA
    only when their A and B have the same shapes, so a kind that still covers several shapes (a rank pattern) gets
    the shape added.
    """
    roles = {name: _role(name) for name in layers}
    roles_of_leaf: dict[str, set[str]] = defaultdict(set)
    for name, role in roles.items():
        roles_of_leaf[_leaf(name)].add(role)
    named = {name: _leaf(name) if len(roles_of_leaf[_leaf(name)]) == 1 else roles[name] for name in layers}
    stacks = _stack_labels(layers)
    named = {name: f"{stacks[name]}.{kind}" if name in stacks else kind for name, kind in named.items()}
    shapes = {name: lora_shape(layer, adapter_name) for name, layer in layers.items()}
    shapes_of_kind: dict[str, set[tuple]] = defaultdict(set)
    for name, kind in named.items():
        shapes_of_kind[kind].add(shapes[name])
    unique = {kind for kind, kind_shapes in shapes_of_kind.items() if len(kind_shapes) == 1}
    return {name: kind if kind in unique else _with_shape(kind, shapes[name]) for name, kind in named.items()}


def lora_shape(layer: LoraLayer, adapter_name: str) -> tuple[int, int, int]:
    """(in_features, r, out_features) of a layer's LoRA."""
    a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    return a.in_features, a.out_features, b.out_features


def lora_parameters(layer: LoraLayer, adapter_name: str) -> list[nn.Parameter]:
    """The LoRA Parameters of one layer (A's weight, B's weight and bias if any)."""
    return [*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()]


def fresh_lora_a(shape: torch.Size, generator: torch.Generator, init: bool | str = True) -> torch.Tensor:
    """A new float32 `lora_A` weight drawn as PEFT's `reset_lora_parameters` draws it, from `generator` (on the CPU).

    `init` is `LoraConfig.init_lora_weights`: True (kaiming-uniform, as `nn.Linear`) or "gaussian" (std 1/r). A
    generator seeded alike gives the same values on every rank, and the global RNG stream (dropout, data order) is
    left as an uninterrupted run would have it.
    """
    weight = torch.empty(shape, dtype=torch.float32)
    if init is True:
        return nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if isinstance(init, str) and init.lower() == "gaussian":
        return nn.init.normal_(weight, std=1 / shape[0], generator=generator)
    raise ValueError(f"Cannot re-initialise LoRA weights initialised with init_lora_weights={init!r}.")


def count_distinct(params: list[torch.Tensor]) -> int:
    """Number of elements in distinct Parameters: tied Parameters count once, sharded ones whole."""
    return sum(full_numel(p) for p in {id(p): p for p in params}.values())


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _with_shape(kind: str, shape: tuple[int, int, int]) -> str:
    in_features, r, out_features = shape
    return f"{kind}[{in_features}x{out_features}r{r}]"


def _stack_labels(layers: dict[str, LoraLayer]) -> dict[str, str]:
    """`{module: stack name}` for the modules inside a stack of layers, when the model has more than one stack.

    A stack is the path before the first layer index (`base_model.model.encoder.block`); its name is what sets it
    apart from the other stacks (`encoder`). Empty when there is one stack, as in decoder-only models and encoders.
    """
    stack_of = {}
    for name in layers:
        parts = name.split(".")
        first_index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if first_index is not None:
            stack_of[name] = tuple(parts[:first_index])
    stacks = sorted(set(stack_of.values()))
    if len(stacks) < 2:
        return {}
    lead = _shared_length(stacks)
    trail = _shared_length([stack[::-1] for stack in stacks])
    labels = {stack: ".".join(stack[lead : len(stack) - trail] or stack[lead:]) for stack in stacks}
    return {name: labels[stack] for name, stack in stack_of.items()}


def _shared_length(sequences: list[tuple[str, ...]]) -> int:
    """How many leading parts all `sequences` have in common."""
    return next((i for i, parts in enumerate(zip(*sequences)) if len(set(parts)) > 1), min(map(len, sequences)))


def _role(name: str) -> str:
    """The path below the last layer index (`attention.output.dense`), or the last two parts outside any layer."""
    parts = name.split(".")
    indices = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[indices[-1] + 1 :] if indices else parts[-2:])
