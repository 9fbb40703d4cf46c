"""The GPU path, run for real: gpt2-small-shaped pretraining throughput (tokens/s, MFU) and the `small` chain.

    python bench/gpu.py                                  # throughput variants + the small preset's whole chain
    python bench/gpu.py --skip_chain                     # throughput only
    python bench/gpu.py --variants compile --batch 32    # one variant
    python bench/gpu.py --smoke                          # on a machine without a GPU: prints why it skipped

Throughput: the real `pipeline/pretrain.py` main() at gpt2-small's shape (12 layers x 768, 12 heads,
context 1024) in bf16, timed over steps after a warm-up (compilation included in the warm-up only).
Variants: `eager` (bf16), `compile` (bf16 + torch_compile), `ckpt` (bf16 + activation checkpointing).
Our byte-level BPE tokenizer (vocab 8192, trained on tinyshakespeare: the corpus is too small for GPT-2's
50,257 merges) replaces GPT-2's vocabulary, so the model has 92M parameters instead of 124M. MFU counts
the model actually trained (nanoGPT's 6N + 12*L*d*T FLOPs per token, N with the tied embedding) against
the device's dense bf16 peak (datasheet table, else a measured bf16 matmul).

Chain: `pipeline/run_all.py --preset small` on tinyshakespeare, every stage through `accelerate launch`
as a user runs it, with PPO shortened (`--ppo_episodes`) to fit a short lease; wall time per stage and
each stage's key metric.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from fluxchat.cli import run_cli

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
GPT2_SMALL = dict(
    n_layer=12,
    n_embd=768,
    n_head=12,
    block_size=1024,
    dropout=0.0,
    learning_rate=6e-4,
    warmup_steps=10,
    adam_beta2=0.95,
    weight_decay=0.1,
)
VARIANTS = {
    "eager": ("--torch_compile", "false"),
    "compile": ("--torch_compile", "true"),
    "ckpt": ("--torch_compile", "false", "--activation_checkpointing", "true"),
}


def device_peak(name: str) -> tuple[float, str]:
    for key, peak in DENSE_BF16_PEAK.items():
        if key in name:
            return peak, f"{key} datasheet dense bf16"
    import torch

    return common.measured_peak_flops(0, size=8192, dtype=torch.bfloat16, device="cuda"), "measured bf16 matmul"


def timed_pretrain(
    text: Path, tokenizer_dir: Path, settings: dict, steps: int, out: Path, extra: tuple
) -> list[float]:
    """pipeline/pretrain.py's main() with a step timer; returns the wall time at the end of each step."""
    import contextlib

    from pipeline import pretrain

    timer = common.step_timer()
    argv = common.pretrain_argv("gpt2-small", text, tokenizer_dir, out, steps, settings)
    argv += ["--bf16", "true", "--pad_vocab_to_multiple_of", "64", "--logging_steps", "10", *extra]
    with common.trainer_callbacks(timer), contextlib.redirect_stdout(sys.stderr):
        pretrain.main(argv)
    return timer.step_ends


def throughput(args, work: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    name = torch.cuda.get_device_name(0)
    peak, peak_source = device_peak(name)
    settings = {
        **GPT2_SMALL,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": args.grad_accum,
    }
    steps, warmup = args.warmup + args.steps, args.warmup
    if args.smoke:
        settings.update(n_layer=2, block_size=128, per_device_train_batch_size=2, gradient_accumulation_steps=1)
        steps, warmup = 5, 2
    tokenizer_dir = common.train_tokenizer(work / "tok", "bpe", 8192)
    rows = []
    for variant in args.variants:
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ends = timed_pretrain(
            common.SHAKESPEARE, tokenizer_dir, settings, steps, work / f"run-{variant}", VARIANTS[variant]
        )
        timed = ends[warmup - 1 :]
        tokens_per_step = (
            settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] * settings["block_size"]
        )
        tokens_per_s = (len(timed) - 1) * tokens_per_step / (timed[-1] - timed[0])
        model = AutoModelForCausalLM.from_pretrained(work / f"run-{variant}")
        flops = common.gpt2_flops_per_token(
            common.non_embedding_params(model), settings["n_layer"], settings["n_embd"], settings["block_size"]
        )
        rows.append(
            {
                "variant": variant,
                "device": name,
                "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "batch": settings["per_device_train_batch_size"],
                "grad_accum": settings["gradient_accumulation_steps"],
                "context": settings["block_size"],
                "tokens_per_s": round(tokens_per_s),
                "mfu_pct": round(100 * flops * tokens_per_s / peak, 1),
                "step_ms": round(1000 * (timed[-1] - timed[0]) / (len(timed) - 1), 1),
                "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 1),
                "wall_s_incl_compile": round(time.perf_counter() - start, 1),
                "peak": peak_source,
            }
        )
        print(
            f"{variant}: {rows[-1]['tokens_per_s']:,} tokens/s, MFU {rows[-1]['mfu_pct']}%",
            file=sys.stderr,
            flush=True,
        )
    return rows


def chain(args, work: Path) -> dict:
    """The small preset's whole chain through run_all.py, as a user types it."""
    env = {**os.environ, "FLUXCHAT_RUNS_DIR": str(work / "runs")}
    cmd = [
        sys.executable,
        "pipeline/run_all.py",
        "--preset",
        "small",
        "--run_name",
        "gpu-small",
        "--stages",
        *args.chain_stages,
        "--train_file",
        str(common.SHAKESPEARE),
        "--stage_args",
        f"ppo:--total_episodes={args.ppo_episodes}",
    ]
    if args.smoke:
        cmd[-1:] = [
            "pretrain:--max_steps=20",
            "sft:--max_steps=10",
            "reward:--max_steps=10",
            "ppo:--total_episodes=64",
        ]
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=common.REPO, env=env)
    summary_file = work / "runs" / "gpu-small" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {
        "exit_code": code,
        "wall_s": round(time.perf_counter() - start, 1),
        "command": " ".join(cmd[1:]),
        **summary,
    }


def main() -> None:
    parser = common.parser("gpu", __doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--grad_accum", type=int, default=1, help="Micro-batches per optimizer step (the gpt2-small preset uses 40)."
    )
    parser.add_argument("--steps", type=int, default=30, help="Timed steps (after --warmup).")
    parser.add_argument("--warmup", type=int, default=10, help="Untimed steps first (torch.compile compiles here).")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--skip_chain", action="store_true", help="Throughput only.")
    parser.add_argument(
        "--chain_stages",
        nargs="+",
        default=["tokenizer", "pretrain", "sft", "reward", "ppo", "evaluate"],
        help="run_all.py --stages for the chain.",
    )
    parser.add_argument("--ppo_episodes", type=int, default=4096, help="PPO prompts in the chain (64 per update).")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        row = {"device": "none", "status": "skipped: no CUDA GPU on this machine (torch.cuda.is_available() is False)"}
        common.print_table("GPU", [row])
        common.write_results(args.output, "gpu", [row], args.smoke, skipped=True)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rows = throughput(args, work)
    common.print_table("GPU pretraining throughput (pipeline/pretrain.py, gpt2-small shape, bf16)", rows)
    extra = {"torch": torch.__version__, "cuda": torch.version.cuda}
    common.write_results(args.output, "gpu", rows, args.smoke, **extra)  # written now: the chain may run out of time
    if not args.skip_chain:
        extra["chain"] = chain(args, work)
        common.print_table("small preset chain (run_all.py)", extra["chain"].get("stages", []))
        common.write_results(args.output, "gpu", rows, args.smoke, **extra)


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
