"""On the GPU machine: put together the model parts that benchmarks/prepare_carry.py cut to fit the transfers.

Each call carries some parts of .carry/models/ (with its manifest.json); `stash` checks them against the manifest
and keeps them in /tmp, which lasts as long as the machine; `unpack` checks that every part is there, extracts the
tar stream into the target directory, and converts a carried GGUF (SmolLM2) to a transformers checkpoint with the
converter recipes.assets uses here, so both machines train the same weights. Only `unpack`'s conversion needs
torch and transformers (and the gguf wheel); the rest is standard library.

    python3 benchmarks/carry_models.py stash                   # after each call that carried a part
    python3 benchmarks/carry_models.py unpack --to /tmp/models # once every part has come
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRIED = ROOT / ".carry" / "models"
STASH = Path("/tmp/carry_parts")


def _manifest() -> dict:
    for directory in (CARRIED, STASH):
        if (directory / "manifest.json").is_file():
            return json.loads((directory / "manifest.json").read_text())
    raise SystemExit("No manifest.json in .carry/models or /tmp/carry_parts: carry .carry/models/manifest.json too.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stash() -> list[str]:
    """Keep every carried part that matches the manifest in /tmp; return the names still missing."""
    manifest = _manifest()
    STASH.mkdir(parents=True, exist_ok=True)
    (STASH / "manifest.json").write_text(json.dumps(manifest))
    missing = []
    for part in manifest["parts"]:
        kept, carried = STASH / part["name"], CARRIED / part["name"]
        if not (kept.is_file() and _sha256(kept) == part["sha256"]):
            if carried.is_file() and _sha256(carried) == part["sha256"]:
                shutil.copyfile(carried, kept)
            else:
                missing.append(part["name"])
    print(f"parts in {STASH}: {len(manifest['parts']) - len(missing)} of {len(manifest['parts'])}; missing {missing}")
    return missing


class _Joined:
    """The parts read one after the other, as one file object (so the tar is never written whole)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths, self._file = list(paths), None

    def read(self, size: int = -1) -> bytes:
        while True:
            if self._file is None:
                if not self._paths:
                    return b""
                self._file = self._paths.pop(0).open("rb")
            data = self._file.read(size)
            if data or size == 0:
                return data
            self._file.close()
            self._file = None


def unpack(target: Path) -> None:
    missing = stash()
    if missing:
        raise SystemExit(f"Cannot unpack: parts {missing} have not been carried yet.")
    parts = [STASH / part["name"] for part in _manifest()["parts"]]
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=_Joined(parts), mode="r|") as tar:
        tar.extractall(target, filter="data")
    for gguf_dir in sorted(target.glob("*-gguf")):
        converted = target / gguf_dir.name.removesuffix("-gguf")
        if not (converted / "config.json").is_file():
            sys.path.insert(0, str(ROOT))
            from recipes.assets import _convert_gguf

            (gguf,) = gguf_dir.glob("*.gguf")
            staging = converted.with_name(converted.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            _convert_gguf(gguf, staging)
            staging.rename(converted)
    print(f"models in {target}: {sorted(p.name for p in target.iterdir())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stash", help="keep the carried parts in /tmp")
    to = sub.add_parser("unpack", help="join the parts and extract the models")
    to.add_argument("--to", type=Path, default=Path("/tmp/models"))
    args = parser.parse_args(argv)
    if args.command == "stash":
        stash()
    else:
        unpack(args.to)


if __name__ == "__main__":
    main()
