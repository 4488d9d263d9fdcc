"""Mode "share" (the paper's method): the dropped modules of one kind share one LoRA, that of the most important.

Where the LoRA Parameters are whole on every rank (one process, DDP, DeepSpeed ZeRO-1/2), the other members of a
group are tied in place to the source's `lora_A` / `lora_B` Parameters, which the optimizer, DDP's reducer and
DeepSpeed's flat buffers already hold: autograd sums every user's gradient, and the Parameters the members used to own
stop receiving gradients. Where they are sharded (FSDP2, ZeRO-3), tying in place cannot survive the engine, and the
members' gradients are tied instead (`grad_tying`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Mode, Run

if TYPE_CHECKING:
    import torch
    from peft.tuners.lora import LoraLayer

    from ..grad_tying import GradientTying
    from ..plan import DropPlan


class Share(Mode):
    name = "share"
    dropped_as = "shared"

    def source_of(self, plan: DropPlan, name: str) -> str | None:
        """The group's source: the most important dropped module of the kind."""
        return plan.shared[plan.kinds[name]][0]

    def settle(self, kept: set[str], shared: dict[str, list[str]]) -> tuple[set[str], dict[str, list[str]]]:
        """A module left alone in its kind shares with nobody: it keeps its own LoRA, so it is kept, and "kept" means
        the same thing in every count (a module with LoRA weights of its own)."""
        alone = {members[0] for members in shared.values() if len(members) == 1}
        return {*kept, *alone}, {kind: members for kind, members in shared.items() if members[0] not in alone}

    def apply(self, layers: dict[str, LoraLayer], plan: DropPlan, *, dropped_scaling: str) -> None:
        """Tie every member of a group to its source's Parameters."""
        from ..grad_tying import shared_groups
        from ..sharding import parameter_engine

        if parameter_engine(p for _, group in shared_groups(layers, plan) for p in group) != "replicated":
            raise ValueError(
                "The LoRA Parameters are sharded (FSDP2 or DeepSpeed ZeRO-3): tying them in place would not survive "
                "the engine. Use reparameterise(..., optimizer), which ties their gradients instead."
            )
        adapter = plan.adapter_name
        for members in plan.shared.values():
            source = layers[members[0]]
            for name in members[1:]:
                for part in ("lora_A", "lora_B"):
                    target_module = getattr(layers[name], part)[adapter]
                    for pname, param in getattr(source, part)[adapter].named_parameters(recurse=False):
                        setattr(target_module, pname, param)

    def reparameterise(self, layers: dict[str, LoraLayer], plan: DropPlan, run: Run) -> GradientTying | None:
        """Tie in place where the LoRA is replicated, else tie the gradients (the `GradientTying` returned); at the
        switch, with `fresh_seed`, start every shared LoRA afresh."""
        from ..grad_tying import GradientTying, shared_groups
        from ..reparam import apply_plan, check_plan_matches
        from ..sharding import parameter_engine

        if parameter_engine(p for _, group in shared_groups(layers, plan) for p in group) == "replicated":
            apply_plan(layers, plan)
            if run.at_switch and run.fresh_seed is not None:
                reinit_shared(layers, plan, run.optimizer, run.fresh_seed)
            return None
        check_plan_matches(layers, plan)
        tying = GradientTying(layers, plan, run.optimizer)
        if run.at_switch:
            tying.align(run.fresh_seed)
        tying.attach()
        return tying


def reinit_shared(
    layers: dict[str, LoraLayer], plan: DropPlan, optimizer: torch.optim.Optimizer | None, seed: int
) -> None:
    """Start every shared LoRA afresh (A as PEFT initialises it, B zero) and forget its optimizer state.

    The random A comes from its own generator seeded with `seed`: every rank draws the same values, and the global
    RNG stream (dropout, data order) is left as an uninterrupted run would have it.
    """
    from ..grad_tying import fresh_values, shared_groups
    from ..reparam import set_values

    sources = [(part, params[:1]) for part, params in shared_groups(layers, plan)]
    set_values(fresh_values(sources, seed), optimizer)
