"""Package attributes that import their module on first use (PEP 562).

`import loradrop_trainer` and `import hub_export` then cost nothing until a name is used, so the `loradrop` command
answers `--version` and `--help` without importing torch, transformers and PEFT.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, names_in: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, which take each public name from its module on first use.

    Args:
        package: the package's `__name__`.
        names_in: submodule (relative to `package`) -> the public names it defines.
    """
    namespace = vars(sys.modules[package])
    module_of = {name: module for module, names in names_in.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module_of[name]}", package), name)
        namespace[name] = value  # later lookups find it without calling __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *module_of})

    return __getattr__, __dir__
