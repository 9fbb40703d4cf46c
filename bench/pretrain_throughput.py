"""Pretraining tokens/s and MFU: pipeline/pretrain.py (transformers' GPT-2 + Trainer) against a plain PyTorch GPT.

    python bench/pretrain_throughput.py                      # tiny preset + nanoGPT's CPU shape, 5 rounds each
    python bench/pretrain_throughput.py --shapes tiny --rounds 5 --steps 100
    python bench/pretrain_throughput.py --smoke              # seconds; checks it runs

The yardstick is bench/plain_gpt.py: nanoGPT's architecture written in plain PyTorch (pre-LN blocks, fused
causal SDPA, tied embeddings, fused AdamW) trained by nanoGPT's loop, so the ratio measures everything the
pipeline adds or loses: transformers' GPT-2 forward/backward and loss, the Trainer's per-step work, the
data path (memory-mapped token shards). Both sides use the same tokens (tinyshakespeare's first 90%),
batch, context, torch threads, AdamW settings and warm-up + cosine schedule. Three sides per round, in
rotating order so a drift in machine load favours none: the real `pretrain.main()` in this process, the
plain GPT, and `accelerate launch pipeline/pretrain.py` in a subprocess (the README's command; its
tokens/s from the run's own per-window log, after warm-up). Only steps after `--warmup` are timed;
evaluation is off. Ratios are per round (pipeline / plain of the same round), then the median.
MFU uses nanoGPT's estimate (6N + 12*L*d*T FLOPs per token) against the best fp32 matmul FLOP/s measured here.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import plain_gpt

from fluxchat import pretraining

SHAPES = {
    # name: (tokenizer, model/batch overrides of configs/tiny/pretrain.yaml)
    "tiny": (("bpe", None), {}),
    "nanogpt-cpu": (
        ("char", 400),
        dict(
            n_layer=4,
            n_embd=128,
            n_head=4,
            block_size=64,
            per_device_train_batch_size=12,
            learning_rate=1e-3,
            warmup_steps=100,
            adam_beta2=0.99,
            weight_decay=0.1,
            dropout=0.0,
        ),
    ),
}
SMOKE_SHAPE = dict(n_layer=2, n_embd=64, n_head=2, block_size=32, per_device_train_batch_size=4)


def settings_for(shape: str, smoke: bool) -> tuple[dict, tuple]:
    from fluxchat.config import CONFIGS_DIR, load_yaml

    (tok_type, vocab), overrides = SHAPES[shape]
    tok_cfg = load_yaml(CONFIGS_DIR / "tiny" / "tokenizer.yaml")
    settings = {**load_yaml(CONFIGS_DIR / "tiny" / "pretrain.yaml"), **overrides, **(SMOKE_SHAPE if smoke else {})}
    return settings, (tok_type, vocab or tok_cfg.get("vocab_size", 1024))


TIMED_KEYS = ("n_layer", "n_embd", "n_head", "block_size", "per_device_train_batch_size", "learning_rate")
TIMED_KEYS += ("warmup_steps", "adam_beta2", "weight_decay", "dropout")


def timed_settings(settings: dict) -> dict:
    """The shape and optimizer settings both sides of the comparison share."""
    return {key: settings[key] for key in TIMED_KEYS}


def pipeline_run(
    text: Path, tokenizer_dir: Path, settings: dict, total_steps: int, out: Path, extra: tuple = ()
) -> list[float]:
    from pipeline import pretrain

    timer = common.step_timer()
    argv = [*common.pretrain_argv("tiny", text, tokenizer_dir, out, total_steps, timed_settings(settings)), *extra]
    with common.trainer_callbacks(timer), contextlib.redirect_stdout(sys.stderr):
        pretrain.main(argv)
    return timer.step_ends


def plain_run(text: Path, tokenizer_dir: Path, settings: dict, total_steps: int) -> tuple[list[float], int]:
    from transformers import AutoTokenizer

    from fluxchat.data import load_text

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_docs, _ = load_text([str(text)], None, "text", 0.1)
    tokens = pretraining.tokenize_documents(tokenizer, train_docs)
    return plain_gpt.train(tokens, settings, len(tokenizer), total_steps, seed=settings.get("seed", 1337)), len(
        tokenizer
    )


def accelerate_run(text: Path, tokenizer_dir: Path, settings: dict, total_steps: int, out: Path, warmup: int) -> float:
    """`accelerate launch pipeline/pretrain.py ...` as a user types it (no --num_cpu_threads_per_process):
    the median of its logged tokens/s windows after the warm-up steps."""
    logging_steps = max(1, (total_steps - warmup) // 5)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "pipeline/pretrain.py"]
    cmd = [*launch, *common.pretrain_argv("tiny", text, tokenizer_dir, out, total_steps, timed_settings(settings))]
    cmd += ["--logging_steps", str(logging_steps)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"accelerate launch failed:\n{result.stderr[-3000:]}")
    history = json.loads((out / "log_history.json").read_text())
    windows = [
        h["tokens_per_second"] for h in history if "tokens_per_second" in h and h["step"] - logging_steps >= warmup
    ]
    return statistics.median(windows or [h["tokens_per_second"] for h in history if "tokens_per_second" in h])


def tokens_per_second(step_ends: list[float], warmup: int, tokens_per_step: int) -> float:
    timed = step_ends[warmup - 1 :]
    return (len(timed) - 1) * tokens_per_step / (timed[-1] - timed[0])


def main() -> None:
    args = common.parser("pretrain_throughput", __doc__)
    args.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="Rounds per shape (pipeline, plain, accelerate launch each), order rotating.",
    )
    args.add_argument("--warmup", type=int, default=10, help="Steps run before timing starts.")
    args.add_argument("--steps", type=int, default=60, help="Timed steps per run.")
    args = args.parse_args()
    if args.smoke:
        args.rounds, args.warmup, args.steps = 1, 2, 3
    threads = common.set_threads(args.threads)
    peak = common.measured_peak_flops(threads, size=512 if args.smoke else 2048)
    print(f"peak fp32 matmul here: {peak / 1e9:.1f} GFLOP/s with {threads} threads", file=sys.stderr)

    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    for shape in args.shapes:
        settings, (tok_type, vocab) = settings_for(shape, args.smoke)
        text = common.corpus(args.smoke)
        tokenizer_dir = common.train_tokenizer(work / f"tok-{tok_type}-{vocab}", tok_type, vocab, text)
        tokens_per_step = settings["per_device_train_batch_size"] * settings["block_size"]
        total = args.warmup + args.steps
        measured = {"pipeline": [], "plain": [], "accelerate launch": []}
        sides = list(measured)
        model_vocab = None
        for round_index in range(args.rounds):
            # rotate the order, so a drift in machine load does not favour one side
            for side in sides[round_index % 3 :] + sides[: round_index % 3]:
                if side == "pipeline":
                    tps = tokens_per_second(
                        pipeline_run(text, tokenizer_dir, settings, total, work / f"run-{shape}"),
                        args.warmup,
                        tokens_per_step,
                    )
                elif side == "plain":
                    ends, model_vocab = plain_run(text, tokenizer_dir, settings, total)
                    tps = tokens_per_second(ends, args.warmup, tokens_per_step)
                else:
                    tps = accelerate_run(text, tokenizer_dir, settings, total, work / f"launch-{shape}", args.warmup)
                measured[side].append(tps)
                print(
                    f"{shape} round {round_index + 1} {side}: {tps:,.0f} tokens/s (load {os.getloadavg()[0]:.1f})",
                    file=sys.stderr,
                )
        model = plain_gpt.GPT(
            model_vocab, settings["block_size"], settings["n_layer"], settings["n_embd"], settings["n_head"]
        )
        non_embedding = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
        flops_per_token = common.gpt2_flops_per_token(
            non_embedding, settings["n_layer"], settings["n_embd"], settings["block_size"]
        )
        for side, values in measured.items():
            median = statistics.median(values)
            rows.append(
                {
                    "shape": shape,
                    "side": side,
                    "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                    "tokens_per_step": tokens_per_step,
                    "tokens_per_s": round(median, 1),
                    "runs_tokens_per_s": [round(v) for v in values],
                    "mfu_pct": round(100 * flops_per_token * median / peak, 2),
                }
            )
        # Each round's runs against the plain run of the same round (same machine state), then the median:
        # steadier than the ratio of the sides' medians when the machine's speed drifts between rounds.
        for side in ("pipeline", "accelerate launch"):
            ratios = [ours / plain for ours, plain in zip(measured[side], measured["plain"])]
            rows.append(
                {
                    "shape": shape,
                    "side": f"ratio {side}/plain",
                    "tokens_per_s": round(statistics.median(ratios), 3),
                    "runs_tokens_per_s": [round(r, 3) for r in ratios],
                }
            )
    common.print_table(
        f"Pretraining throughput ({threads} threads, peak {peak / 1e9:.0f} GFLOP/s fp32)",
        rows,
        ["shape", "side", "params_M", "tokens_per_step", "tokens_per_s", "mfu_pct", "runs_tokens_per_s"],
    )
    common.write_results(
        args.output,
        "pretrain_throughput",
        rows,
        args.smoke,
        peak_flops=peak,
        rounds=args.rounds,
        warmup_steps=args.warmup,
        timed_steps=args.steps,
    )


if __name__ == "__main__":
    main()
