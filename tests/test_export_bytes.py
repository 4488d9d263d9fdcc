"""Every file the exporters write, pinned byte for byte (issue 31): the compact adapter and each plain form of it, in
modes "share", "truncate" and "drop", from a model whose weights are arithmetic, not random. A change to how a mode
is stored, expanded or described shows here first; one that is meant must update GOLDEN and say so.

SVD rounding differs between LAPACK builds, so the bytes are pinned for the torch release CI installs
(.ci/install.sh) and the test is skipped under any other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from peft import LoraConfig

from hub_export import expand_to_peft, export_adapter, save_compact
from loradrop_trainer import build_plan, find_lora_layers, lora_kinds
from loradrop_trainer.reparam import reparameterise
from loradrop_trainer.truncate import record_truncation

PINNED_TORCH = "2.13.0"
VERSION_KEYS = {"written_by", "peft_version"}  # name the library releases that wrote a file, not the adapter
GOLDEN: dict[str, dict[str, str]] = {
    "share": {
        "compact/README.md": "8df8506080ccd70e2584ed896bc6fb148245c02aa5ca56bfecca0bc22e8ea448",
        "compact/adapter_compact.safetensors": "4bfdd281d27621cce5e3d50e45162f938a80fa51843f78fcd5652d578f16defe",
        "compact/adapter_config.json": "a748c84f701bd579d0723b163e43f689fa8ec803ed4911c673570dc1da5d6991",
        "compact/loradrop_compact.json": "3ca7e85c0c6df887bf0fc93f311359cd2df6d3da72ec869aa58c3151091d0ec6",
        "peft/adapter_config.json": "a748c84f701bd579d0723b163e43f689fa8ec803ed4911c673570dc1da5d6991",
        "peft/adapter_model.safetensors": "8e32f80cec341f9109057b150d11387b4597cd84548364c940b5ee1f4af3d330",
        "uniform/adapter_config.json": "a748c84f701bd579d0723b163e43f689fa8ec803ed4911c673570dc1da5d6991",
        "uniform/adapter_model.safetensors": "8e32f80cec341f9109057b150d11387b4597cd84548364c940b5ee1f4af3d330",
    },
    "truncate": {
        "compact/README.md": "1ac48305d9a869999dc6dae0435c9678b64fe27793e2b62870eb5f1ae0ff4da6",
        "compact/adapter_compact.safetensors": "326a683d5f63069c761254cb56006bb05501f57ef556b4a86b5120b2b1f5888f",
        "compact/adapter_config.json": "3cd6998a6216bdbef053635b86e74cfcc60e03f409f2b90bb726483272234d15",
        "compact/loradrop_compact.json": "5741a2fb3cecc2b70328d283125690764ba26ebfc8551a31f53e7f16dfa8e5b6",
        "peft/adapter_config.json": "bfc4ad5d14b61e82b2bb7637be3dde86671ee9fc916a94991588e9d0ded8dc68",
        "peft/adapter_model.safetensors": "d203813499c82664c28afa81d032ab551f120d13b7802df4f38b502953c9646b",
        "uniform/adapter_config.json": "a748c84f701bd579d0723b163e43f689fa8ec803ed4911c673570dc1da5d6991",
        "uniform/adapter_model.safetensors": "850c297fb327fae9e9be38457d029b0d6bfa9562e321d8bb66ac68afc419d702",
    },
    "drop": {
        "compact/README.md": "e2387b373dfc92051144a1e2d78b490fa9537dd9311e1df8720929ffd1059d59",
        "compact/adapter_compact.safetensors": "1243de7bf2da13baf6d396b74bf31cff0b861f94997d1e5bdd2387880d0ae110",
        "compact/adapter_config.json": "a748c84f701bd579d0723b163e43f689fa8ec803ed4911c673570dc1da5d6991",
        "compact/loradrop_compact.json": "f7771623d8434785c73d646b59d35ae3185d2f1eaacce13189e3374b43237a2a",
        "peft/adapter_config.json": "a748c84f701bd579d0723b163e43f689fa8ec803ed4911c673570dc1da5d6991",
        "peft/adapter_model.safetensors": "0e103244863468921f28b6ac199880e10965179422f364d061de6c91e0f47b86",
        "uniform/adapter_config.json": "a748c84f701bd579d0723b163e43f689fa8ec803ed4911c673570dc1da5d6991",
        "uniform/adapter_model.safetensors": "0e103244863468921f28b6ac199880e10965179422f364d061de6c91e0f47b86",
    },
}


def _arithmetic_model(mode: str):
    """A tiny Llama with LoRA whose every weight is a fixed function of its position, re-parameterised by a plan made
    from fixed importances."""
    model = tiny_llama(seed=0)
    with torch.no_grad():
        for i, (_, param) in enumerate(sorted(model.named_parameters())):
            positions = torch.arange(param.numel(), dtype=torch.float64)
            param.copy_((0.05 * torch.sin(positions * (0.37 + 0.01 * i))).reshape(param.shape))
    layers = find_lora_layers(model)
    importance = {name: 1.0 + (i * 7919 % 13) for i, name in enumerate(layers)}
    plan = build_plan(importance, lora_kinds(layers), 0.6, mode=mode, dropped_rank=1 if mode == "truncate" else None)
    reparameterise(layers, plan, None, at_switch=True)
    if mode == "truncate":  # what LoraDropCallback records at the switch
        record_truncation(model.peft_config["default"], layers, plan)
    return model.eval(), plan


def _digest(path: Path) -> str:
    """The file's sha256; of a JSON file, without the fields that name library releases, and of a PEFT config, without
    the fields at PEFT's defaults (each PEFT release adds some: what loradrop writes is what differs from them)."""
    data = path.read_bytes()
    if path.suffix == ".json":
        content = {k: v for k, v in json.loads(data).items() if k not in VERSION_KEYS}
        if path.name == "adapter_config.json":
            defaults = json.loads(json.dumps(LoraConfig().to_dict(), default=sorted))
            content = {k: v for k, v in content.items() if k not in defaults or v != defaults[k]}
        data = json.dumps(content, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def exported_digests(root: Path, mode: str) -> dict[str, str]:
    """`{form/file: sha256}` of the compact adapter of `_arithmetic_model(mode)` and of each plain form of it."""
    model, plan = _arithmetic_model(mode)
    compact = save_compact(model, root / "compact", plan=plan, base_model="org/tiny-llama")
    forms = {"compact": compact, "peft": expand_to_peft(compact, root / "peft")}
    forms["uniform"] = export_adapter(compact, root / "uniform", form="uniform")
    return {
        f"{form}/{path.name}": _digest(path)
        for form, directory in forms.items()
        for path in sorted(Path(directory).rglob("*"))
        if path.is_file() and path.suffix != ".png"  # matplotlib's bytes vary with its release
    }


@pytest.mark.skipif(not torch.__version__.startswith(PINNED_TORCH), reason=f"bytes pinned for torch {PINNED_TORCH}")
@pytest.mark.parametrize("mode", ["share", "truncate", "drop"])
def test_31_exported_bytes_are_unchanged(mode, tmp_path):
    assert exported_digests(tmp_path, mode) == GOLDEN[mode]
