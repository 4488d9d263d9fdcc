"""LoRA-drop on sharded engines: FSDP2 through the Trainer, DeepSpeed ZeRO-3 and FSDP2 + QLoRA, each next to plain LoRA.

One launch measures one engine, at Llama-2-7B width with random weights by default: bf16, activation checkpointing,
LoRA (r=8) on all seven kinds, 24 optimizer steps with the switch at about 30% (end of step 8). In the same
processes it runs

1. plain LoRA (no callback), for the step time and memory to compare with, and as the control of the logit check
   below: its gathered weights, put into a plain PEFT model on rank 0, show how far the engine's own forward is from
   an unsharded one with the very same weights; the same comparison with the copy's LoRA weights cast to bf16
   (what FSDP2's mixed precision computes with) shows how much of that gap is the compute precision;
2. LoRA-drop, with a checkpoint after the switch (step 12); at the switch and at the end it gathers the LoRA weights
   and checks that every member of a shared group equals its source; at the end it takes the trained model's logits
   on a fixed batch, exports the compact adapter (`save_compact` on every rank) and, on rank 0, loads it onto a fresh
   base loaded the same way and compares the logits;
3. LoRA-drop resumed from the step-12 checkpoint, which must end with the same LoRA weights (SHA-256) as run 2, and
   plain LoRA resumed likewise, which shows whether the engine itself resumes exactly. For both, the largest weight
   difference to the uninterrupted run is recorded, and whether the weights the resumed run starts from are the
   ones the uninterrupted run saved (SHA-256 at step 12 in both): if they are, any difference comes from the
   training steps after it, not from the checkpoint. `--deterministic` runs everything under
   `transformers.enable_full_determinism` (deterministic algorithms, cuBLAS workspace), strict: an operation
   without a deterministic implementation raises, naming itself; what PyTorch still warns is not deterministic is
   recorded (`nondeterministic_ops`);
4. `--repeats` - 1 more plain/LoRA-drop pairs, interleaved, for the spread of the step-time ratio.

Every rank's plan is gathered and compared. Per-step wall time and peak GPU memory are recorded per rank. Results go
to `<out>/<engine>.json` (and a line per run on stdout; checkpoints and adapters go to `--runs_dir`); `summarise`
prints the lines of several such files.

    # 2 GPUs, real size (Llama-2-7B config, random weights written once to --base_dir), one engine per launch
    torchrun --nproc_per_node 2 benchmarks/sharded_gpu.py --engine fsdp2 --out benchmarks/results/sharded_h200x2
    torchrun --nproc_per_node 2 benchmarks/sharded_gpu.py --engine zero3 --out benchmarks/results/sharded_h200x2
    torchrun --nproc_per_node 2 benchmarks/sharded_gpu.py --engine fsdp2-qlora --out benchmarks/results/sharded_h200x2
    python benchmarks/sharded_gpu.py summarise benchmarks/results/sharded_h200x2/*.json

    # smoke test: one GPU, a 4-layer model of Llama-2 width
    torchrun --nproc_per_node 1 benchmarks/sharded_gpu.py --engine fsdp2 --size small --out /tmp/sharded_smoke
    # CPU, 2 processes (gloo), tiny model: the engines that run on a CPU (ZeRO-3; the Trainer applies no FSDP there)
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/sharded_gpu.py --engine zero3 --size tiny --out /tmp/s

On a GPU machine without network, each call installs the wheels it carries (`source benchmarks/device_setup.sh`, as
the other GPU scripts do) and writes the base again (a fresh machine starts bare). `fsdp2` and `zero3` take `.whl`
from benchmarks/fetch_device_wheels.sh (24 MiB); `fsdp2-qlora` also needs bitsandbytes (41 MiB), and the two together
exceed what a call carries (64 MiB), so it carries a smaller set instead:

    mkdir -p .whl_qlora && cp .whl/{transformers,peft,accelerate,huggingface_hub,httpx2,httpcore2,truststore}-*.whl \
        .whl/tokenizers-*.whl .whl_qlora/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2 -d .whl_qlora           # ~60 MiB in all
    # on the machine:  WHEELS=.whl_qlora source benchmarks/device_setup.sh && torchrun ... --engine fsdp2-qlora ...

Engines: `fsdp2` (TrainingArguments(fsdp="full_shard", fsdp_config version 2, decoder layers wrapped, FSDP's own
activation checkpointing), `zero3` (recipes/ds_zero3.json), `fsdp2-qlora` (the base loaded in nf4 with
`bnb_4bit_quant_storage=bfloat16`, so FSDP2 can shard the packed weights; FSDP2 keeps the bf16 dtypes, so
`prepare_model_for_kbit_training`, which upcasts to fp32, is not applied, here or when reloading).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402
from transformers import (  # noqa: E402
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import enable_full_determinism  # noqa: E402

from hub_export import load_compact, save_compact  # noqa: E402
from loradrop_trainer import LoraDropCallback  # noqa: E402
from loradrop_trainer.sharding import lora_state_dict  # noqa: E402

ENGINES = ("fsdp2", "zero3", "fsdp2-qlora")
SIZES = {  # Llama-2-7B's configuration, and smaller ones of the same shape for smoke tests
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "small": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
}
# Per-kind threshold (the default normalisation): a 4-layer model has 4 modules per kind, and with near-uniform
# importance a kind reaches 0.9 only with all 4, so the smoke sizes use 0.5 to have shared groups to check.
THRESHOLDS = {"llama2-7b": 0.9, "small": 0.5, "tiny": 0.5}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
MAX_STEPS = 24
ALPHA = 0.3  # switch at the end of step ceil(0.3 * 24) = 8
SAVE_STEP = 12


class RandomTokens(Dataset):
    """Random token sequences with causal-LM labels: the same rows on every rank and every run."""

    def __init__(self, rows: int, length: int, vocab: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (rows, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class Probe(TrainerCallback):
    """Step times and peak memory, and (listed after LoraDropCallback) the checks at the switch and at the end.

    Peak memory is counted above `baseline`, what was allocated before the run loaded its model: DeepSpeed keeps some
    of an earlier engine's memory alive in the same process, which would otherwise count against the later runs."""

    def __init__(self, drop: LoraDropCallback | None, baseline: int) -> None:
        self.drop = drop
        self.baseline = baseline
        self.steps: list[dict] = []
        self.checks: dict = {}
        self.lora: dict[str, torch.Tensor] = {}
        self._start = 0.0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == SAVE_STEP and not self.steps:  # a run resumed from the step-12 checkpoint
            self.checks["lora_sha256_at_resume"] = sha256(lora_state_dict(model, "default")[0])
        _synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _synchronize()
        seconds = time.perf_counter() - self._start
        peak = torch.cuda.max_memory_allocated() - self.baseline if torch.cuda.is_available() else 0
        self.steps.append({"step": state.global_step, "seconds": seconds, "peak_bytes": peak})
        if state.global_step == SAVE_STEP:  # what the checkpoint of this step holds
            self.checks["lora_sha256_at_save"] = sha256(lora_state_dict(model, "default")[0])
        plan = self.drop.plan if self.drop is not None else None
        if plan is not None and state.global_step == plan.step:
            self.checks["members_equal_at_switch"] = members_equal(lora_state_dict(model, "default")[0], plan)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        lora = lora_state_dict(model, "default")[0]
        self.lora = {key: value.detach().float().cpu().clone() for key, value in lora.items()}
        self.checks["lora_sha256"] = sha256(lora)
        plan = self.drop.plan if self.drop is not None else None
        if plan is not None:
            self.checks["members_equal_at_end"] = members_equal(lora, plan)


def members_equal(lora: dict[str, torch.Tensor], plan) -> bool:
    """Whether every member of every shared group holds exactly its source's LoRA (gathered PEFT state dict)."""
    return all(
        torch.equal(lora[f"{name}.{part}.weight"], lora[f"{members[0]}.{part}.weight"])
        for members in plan.shared.values()
        for name in members[1:]
        for part in ("lora_A", "lora_B")
    )


def sha256(lora: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(lora):
        digest.update(key.encode())
        digest.update(lora[key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _dtype() -> torch.dtype:
    """bf16 on GPUs (as trained there); float32 on a CPU, where the Trainer trains without mixed precision."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather(value) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def write_base(opts) -> Path:
    """The random base model, written once (rank 0) in bf16, so that every run and every reload load the same one."""
    directory = Path(opts.base_dir) / opts.size
    if _rank() == 0 and not (directory / "config.json").exists():
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=opts.seq_len, **SIZES[opts.size])
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=_dtype())
        model.save_pretrained(directory)
        del model
    _barrier()
    return directory


def load_base(opts, base_dir: Path, for_reload: bool = False):
    """The base as the engine trains it. `for_reload`: on rank 0's GPU alone, to load the exported adapter onto."""
    kwargs: dict = {"dtype": _dtype()}
    if opts.engine == "fsdp2-qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,  # FSDP2 shards the packed 4-bit weights as bf16 tensors
        )
    if torch.cuda.is_available() and (for_reload or opts.engine != "zero3"):  # ZeRO-3 partitions while loading
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return LlamaForCausalLM.from_pretrained(base_dir, **kwargs)


def training_arguments(opts, output_dir: Path) -> TrainingArguments:
    engine_args: dict = {}
    if opts.engine.startswith("fsdp2"):
        engine_args["fsdp"] = "full_shard"
        engine_args["fsdp_config"] = {
            "version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "activation_checkpointing": True,
        }
    else:
        engine_args["deepspeed"] = str(ROOT / "recipes" / "ds_zero3.json")
        engine_args["activation_checkpointing"] = True
    on_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=2,
        learning_rate=2e-4,
        max_steps=MAX_STEPS,
        warmup_steps=0,  # importance is zero until B moves: step 1 must already train
        lr_scheduler_type="constant",
        bf16=not on_cpu,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEP,
        report_to=[],
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu else None,
        **engine_args,
    )


def train(
    opts, base_dir: Path, name: str, loradrop: bool, resume_from: Path | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One Trainer run; returns its record (the same on every rank except the per-rank timings) and its final LoRA
    weights (gathered, float32, on the CPU)."""
    output_dir = Path(opts.runs_dir) / opts.engine / name
    gc.collect()  # the previous run's Trainer, callbacks and model went with its frame; free their reference cycles
    baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    args = training_arguments(opts, output_dir)  # before loading: under ZeRO-3, from_pretrained then partitions
    if opts.engine == "zero3" and args.use_cpu:  # on GPUs the arguments set up DeepSpeed's process group already
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = get_peft_model(load_base(opts, base_dir), LORA)
    # mode "share": what this script checks is the gradient tying of shared groups on sharded engines
    drop = (
        LoraDropCallback(alpha=ALPHA, threshold=THRESHOLDS[opts.size], mode="share", save_plot=False)
        if loradrop
        else None
    )
    probe = Probe(drop, baseline)
    data = RandomTokens(rows=MAX_STEPS * 4 * opts.batch_size * 2, length=opts.seq_len, vocab=model.config.vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[c for c in (drop, probe) if c is not None])
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    record = {
        "run": name,
        "engine": opts.engine,
        "size": opts.size,
        "world_size": args.world_size,
        "wall_s": time.perf_counter() - started,
        "steps": probe.steps,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        **probe.checks,
    }
    if opts.deterministic:
        record["nondeterministic_ops"] = sorted(
            {str(w.message).splitlines()[0] for w in caught if "deterministic" in str(w.message)}
        )
    if drop is not None and drop.plan is not None:
        plans = _gather(drop.plan.to_dict())
        record.update(
            switch_step=drop.plan.step,
            kept_modules=len(drop.plan.kept),
            total_modules=len(drop.plan.kinds),
            lora_params=[drop.lora_params_before, drop.lora_params_after],
            same_plan_on_every_rank=all(plan == plans[0] for plan in plans),
        )
    if resume_from is None:
        compact = output_dir / "compact" if loradrop else None
        record.update(check_reload(opts, base_dir, trainer.model, probe.lora, compact))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # the next run's Trainer configures accelerate afresh, in the same processes
    GradientState._reset_state()
    return record, probe.lora


def check_reload(opts, base_dir: Path, model, trained_lora: dict[str, torch.Tensor], directory: Path | None) -> dict:
    """The trained model's logits on a fixed batch against rank 0's unsharded copy of it, on a fresh base loaded the
    same way: the compact export reloaded with `load_compact` when `directory` is given (LoRA-drop, `save_compact` on
    every rank), else the gathered LoRA weights put into a plain PEFT model (plain LoRA: the control, which shows
    how far the engine's own forward is from an unsharded one with the very same weights).

    The copy must hold the trained LoRA weights (`trained_lora`, gathered at the end of training) exactly, every
    module (shared groups expanded).
    """
    ids = RandomTokens(rows=1, length=64, vocab=model.config.vocab_size, seed=1).ids
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids.to(device)).logits.float().cpu()  # every rank: the model is sharded
    result = {}
    if directory is not None:
        save_compact(model, directory)
        if _rank() == 0:
            result["compact_bytes"] = sum(f.stat().st_size for f in directory.iterdir())
    if _rank() == 0:
        if opts.engine == "zero3":  # rank 0 alone loads the base: not partitioned across the ranks this time
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        base = load_base(opts, base_dir, for_reload=True)
        if directory is not None:
            copy = load_compact(base, directory)
        else:
            copy = get_peft_model(base, LORA)
            set_peft_model_state_dict(copy, trained_lora)
        copy.eval()
        copy_lora = lora_state_dict(copy, "default")[0]
        result["reload_lora_identical"] = copy_lora.keys() == trained_lora.keys() and all(
            torch.equal(copy_lora[key].float().cpu(), trained_lora[key]) for key in trained_lora
        )
        with torch.no_grad():
            logits = copy(input_ids=ids.to(device)).logits.float().cpu()
            for name, param in copy.named_parameters():  # FSDP2's bf16 mixed precision computes with these
                if "lora_" in name:
                    param.data = param.data.to(torch.bfloat16)
            logits_bf16_lora = copy(input_ids=ids.to(device)).logits.float().cpu()
        result.update(
            reload_max_abs_logit_diff=(logits - trained).abs().max().item(),
            reload_logits_close=bool(torch.allclose(logits, trained, rtol=2e-2, atol=2e-2)),
            reload_bf16_lora_max_abs_logit_diff=(logits_bf16_lora - trained).abs().max().item(),
            logit_scale=trained.abs().max().item(),
        )
        del copy, base
    _barrier()
    return _gather(result)[0]


def phase_stats(steps: list[dict], switch: int, after: bool) -> dict | None:
    """Median and quartiles of the step time and the peak memory of one phase, leaving out step 1 (warm-up); None
    for a phase the run did not train (a resumed run starts after the switch)."""
    chosen = [s for s in steps if s["step"] > 1 and (s["step"] > switch) == after]
    if not chosen:
        return None
    seconds = sorted(s["seconds"] for s in chosen)
    quartiles = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else seconds * 3
    return {
        "median_s": statistics.median(seconds),
        "q1_s": quartiles[0],
        "q3_s": quartiles[2],
        "peak_gib": max(s["peak_bytes"] for s in chosen) / 2**30,
        "steps": len(chosen),
    }


def main(opts) -> None:
    if opts.deterministic:
        enable_full_determinism(0)  # strict: a non-deterministic op raises, naming itself
        os.environ.pop("CUDA_LAUNCH_BLOCKING")  # it sets this too, which only slows every launch down
    base_dir = write_base(opts)
    switch = math.ceil(ALPHA * MAX_STEPS)
    runs, weights = [], {}
    for repeat in range(opts.repeats):
        for name, loradrop in (("lora", False), ("loradrop", True)):
            record, weights[f"{name}_{repeat}"] = train(opts, base_dir, f"{name}_{repeat}", loradrop=loradrop)
            runs.append(record)
    for name, loradrop in (("lora", False), ("loradrop", True)):  # plain LoRA: does the engine itself resume exactly?
        checkpoint = Path(opts.runs_dir) / opts.engine / f"{name}_0" / f"checkpoint-{SAVE_STEP}"
        record, resumed = train(opts, base_dir, f"{name}_resumed", loradrop=loradrop, resume_from=checkpoint)
        record["resume_max_abs_diff"] = max((resumed[k] - weights[f"{name}_0"][k]).abs().max().item() for k in resumed)
        saved = next(r for r in runs if r["run"] == f"{name}_0").get("lora_sha256_at_save")
        record["resumed_from_the_saved_weights"] = saved is not None and record.get("lora_sha256_at_resume") == saved
        runs.append(record)
    per_rank = _gather({r["run"]: r["steps"] for r in runs})
    by_name = {r["run"]: r for r in runs}

    def resumed_exactly(name: str) -> bool:
        return by_name[f"{name}_resumed"]["lora_sha256"] == by_name[f"{name}_0"]["lora_sha256"]

    summary = {
        "engine": opts.engine,
        "size": opts.size,
        "world_size": runs[0]["world_size"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "deterministic": opts.deterministic,
        "resume_sha256_identical": resumed_exactly("loradrop"),
        "plain_lora_resume_sha256_identical": resumed_exactly("lora"),
        "runs": runs,
        "per_rank_steps": per_rank,
        "phases": {},
    }
    for name in by_name:
        for rank, rank_runs in enumerate(per_rank):
            steps = rank_runs[name]
            summary["phases"][f"{name}/rank{rank}"] = {
                "before_switch": phase_stats(steps, switch, after=False),
                "after_switch": phase_stats(steps, switch, after=True),
            }
    ratios = []
    for repeat in range(opts.repeats):
        for rank in range(len(per_rank)):
            pruned = summary["phases"][f"loradrop_{repeat}/rank{rank}"]["after_switch"]["median_s"]
            plain = summary["phases"][f"lora_{repeat}/rank{rank}"]["after_switch"]["median_s"]
            ratios.append(pruned / plain)
    summary["step_time_ratio_after_switch"] = {"values": ratios, "min": min(ratios), "max": max(ratios)}
    if _rank() == 0:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"{opts.engine}_deterministic" if opts.deterministic else opts.engine
        (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
        for line in summary_lines(summary):
            print(line, flush=True)
    _barrier()


def summary_lines(summary: dict) -> list[str]:
    """One line per run and the checks, for logs and for `summarise`."""
    lines = []
    for run in summary["runs"]:
        phases = [summary["phases"][key] for key in summary["phases"] if key.startswith(run["run"] + "/")]
        after = ", ".join(f"{p['median_s']:.3f}s/{p['peak_gib']:.1f}GiB" for p in (q["after_switch"] for q in phases))
        checks = {
            k: run[k]
            for k in (
                "same_plan_on_every_rank",
                "members_equal_at_switch",
                "members_equal_at_end",
                "kept_modules",
                "resume_max_abs_diff",
                "resumed_from_the_saved_weights",
                "nondeterministic_ops",
                "reload_lora_identical",
                "reload_logits_close",
                "reload_max_abs_logit_diff",
                "reload_bf16_lora_max_abs_logit_diff",
            )
            if k in run
        }
        lines.append(f"{summary['engine']:<12} {run['run']:<18} after switch (per rank) {after}  {json.dumps(checks)}")
    ratio = summary["step_time_ratio_after_switch"]
    lines.append(
        f"{summary['engine']:<12} resume SHA-256 identical: {summary['resume_sha256_identical']} (plain LoRA: "
        f"{summary.get('plain_lora_resume_sha256_identical')}); step-time ratio "
        f"LoRA-drop/LoRA after the switch {ratio['min']:.3f}..{ratio['max']:.3f} over {len(ratio['values'])} rank-runs"
    )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--size", choices=list(SIZES), default="llama2-7b")
    parser.add_argument("--out", default="benchmarks/results/sharded", help="Where <engine>.json is written.")
    parser.add_argument(
        "--runs_dir", default="/tmp/loradrop_sharded_runs", help="The runs' checkpoints and compact adapters."
    )
    parser.add_argument("--base_dir", default="/tmp/loradrop_random_base", help="Where the random base is written.")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=2, help="Sequences per GPU and micro-batch (2 a step).")
    parser.add_argument("--repeats", type=int, default=1, help="Plain/LoRA-drop pairs, for the step-time spread.")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="Deterministic algorithms (transformers.enable_full_determinism, strict); <engine>_deterministic.json.",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["summarise"]:
        for path in sys.argv[2:]:
            print("\n".join(summary_lines(json.loads(Path(path).read_text()))))
    else:
        main(parse_args())
