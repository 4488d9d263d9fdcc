"""Export, share and reload LoRA-drop adapters: the compact format, plain-PEFT expansion and Hugging Face Hub transfer.

```python
from hub_export import save_compact, load_compact, expand_to_peft, push_to_hub, load_from_hub

save_compact(trainer.model, "out/compact", plan=callback.plan)   # each distinct LoRA once, plus the plan
model = load_compact(base_model, "out/compact")                  # PeftModel, shared modules tied again
expand_to_peft("out/compact", "out/peft")                        # plain PEFT adapter, no loradrop needed to load
export_adapter("out/compact", "out/vllm", form="vllm")           # one rank, one scaling: vLLM, llama.cpp, ...
compact_peft_adapter("out/checkpoint-500", "out/compact")        # what trainer.save_model() wrote, compacted
push_to_hub("out/compact", "user/repo", base_model="org/base")   # returns the commit URL
model = load_from_hub(base_model, "user/repo", revision=None)
```

Local paths and Hub repos are never confused: only `load_from_hub`, `pull` and `push_to_hub` reach the Hub. Every
adapter is checked as untrusted input before it is used (`hub_export.validate`), and nothing is written over a
directory holding files this package did not write (`hub_export.atomic`). The `loradrop` command is `hub_export.cli`.
Names are imported on first use, so `import hub_export` alone loads neither torch nor PEFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loradrop_trainer.lazy import lazy_exports

if TYPE_CHECKING:
    from .compact import read_compact, save_compact
    from .errors import (
        BaseModelMismatchError,
        BaseModelPathError,
        CompactFileNotFoundError,
        CompactFormatError,
        ExportError,
        HubAuthError,
        HubError,
        HubGatedRepoError,
        HubHTTPError,
        HubOfflineError,
        HubRevisionNotFoundError,
        PlanError,
        RepoNotFoundError,
        RepoVisibilityError,
        TargetExistsError,
        UnsupportedFormatVersionError,
    )
    from .expand import expand_to_peft
    from .format import CompactAdapter
    from .from_peft import compact_peft_adapter
    from .hub import PushInfo, load_from_hub, pull, push_to_hub
    from .loader import load_compact
    from .serving import export_adapter

_NAMES_IN = {
    "compact": ("read_compact", "save_compact"),
    "errors": (
        "BaseModelMismatchError",
        "BaseModelPathError",
        "CompactFileNotFoundError",
        "CompactFormatError",
        "ExportError",
        "HubAuthError",
        "HubError",
        "HubGatedRepoError",
        "HubHTTPError",
        "HubOfflineError",
        "HubRevisionNotFoundError",
        "PlanError",
        "RepoNotFoundError",
        "RepoVisibilityError",
        "TargetExistsError",
        "UnsupportedFormatVersionError",
    ),
    "expand": ("expand_to_peft",),
    "format": ("CompactAdapter",),
    "from_peft": ("compact_peft_adapter",),
    "hub": ("PushInfo", "load_from_hub", "pull", "push_to_hub"),
    "loader": ("load_compact",),
    "serving": ("export_adapter",),
}

__all__ = sorted(name for names in _NAMES_IN.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES_IN)
