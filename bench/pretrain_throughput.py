"""Pretraining tokens/s and MFU: pipeline/pretrain.py (transformers' GPT-2 + Trainer) against a plain PyTorch GPT.

    python bench/pretrain_throughput.py                      # tiny preset + nanoGPT's CPU shape, 5 rounds each
    python bench/pretrain_throughput.py --shapes tiny --rounds 5 --steps 100
    python bench/pretrain_throughput.py --smoke              # seconds; checks it runs

The yardstick is bench/plain_gpt.py: nanoGPT's architecture written in plain PyTorch (pre-LN blocks, fused
causal SDPA, tied embeddings, fused AdamW) trained by nanoGPT's loop, so the ratio measures everything the
pipeline adds or loses: transformers' GPT-2 forward/backward and loss, the Trainer's per-step work, the
data path (memory-mapped token shards). Both sides use the same tokens (tinyshakespeare's first 90%),
batch, context, torch threads, AdamW settings and warm-up + cosine schedule. Three sides per round, in
rotating order so a drift in machine load favours none, each in a fresh process (bench/timed_side.py):
`python pipeline/pretrain.py`'s main(), the plain GPT, and `accelerate launch pipeline/pretrain.py` (the
README's command). Every side is timed the same way: the wall time from the end of step `--warmup` to the
end of the last step (stalls included), from a per-step timer. Evaluation is off. Ratios are per round
(pipeline / plain of the same round), then the median.
MFU uses nanoGPT's estimate (6N + 12*L*d*T FLOPs per token) against the best fp32 matmul FLOP/s measured here.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import plain_gpt
from transformers import AutoTokenizer

from fluxchat.cli import run_cli

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


def run_side(
    side: str, out: Path, args: list[str], threads: int | None, launcher: list[str] | None = None
) -> list[float]:
    """One side in a fresh process (bench/timed_side.py): its step end times. `launcher` runs it the way a user
    launches the stage (e.g. `accelerate launch`, which sets the child's environment its own way)."""
    times = out.with_suffix(".steps.json")
    cmd = [*(launcher or [sys.executable]), str(Path(__file__).with_name("timed_side.py")), str(times), side, *args]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell has it
    if threads:  # --threads: every side gets the same count (torch reads OMP_NUM_THREADS at start-up)
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{side} side failed ({' '.join(cmd[:4])} ...):\n{result.stderr[-3000:]}")
    return json.loads(times.read_text())


def pipeline_run(text: Path, tokenizer_dir: Path, settings: dict, total_steps: int, out: Path, threads) -> list[float]:
    """`python pipeline/pretrain.py ...`'s main(), as the README runs it."""
    return run_side(
        "pipeline",
        out,
        common.pretrain_argv("tiny", text, tokenizer_dir, out, total_steps, timed_settings(settings)),
        threads,
    )


def plain_run(text: Path, tokenizer_dir: Path, settings: dict, total_steps: int, out: Path, threads) -> list[float]:
    settings_file = out.with_suffix(".settings.json")
    settings_file.write_text(json.dumps(settings))
    return run_side("plain", out, [str(settings_file), str(text), str(tokenizer_dir), str(total_steps)], threads)


def accelerate_run(
    text: Path, tokenizer_dir: Path, settings: dict, total_steps: int, out: Path, threads
) -> list[float]:
    """`accelerate launch pipeline/pretrain.py ...` as a user types it: no --num_cpu_threads_per_process
    unless --threads asks every side for a thread count."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    argv = common.pretrain_argv("tiny", text, tokenizer_dir, out, total_steps, timed_settings(settings))
    if threads:  # accelerate pins its child to 1 thread unless told: give it the count the other sides get
        launch += ["--num_cpu_threads_per_process", str(threads)]
    return run_side("pipeline", out, argv, threads, launcher=launch)


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
        # one shape: every side is a fresh process (~6 s of imports each), and the shapes differ only in settings
        args.rounds, args.warmup, args.steps = 1, 2, 3
        args.shapes = args.shapes[-1:]
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
        for round_index in range(args.rounds):
            # rotate the order, so a drift in machine load does not favour one side
            for side in sides[round_index % 3 :] + sides[: round_index % 3]:
                run = {"pipeline": pipeline_run, "plain": plain_run, "accelerate launch": accelerate_run}[side]
                out = work / f"{side.replace(' ', '-')}-{shape}"
                tps = tokens_per_second(
                    run(text, tokenizer_dir, settings, total, out, args.threads), args.warmup, tokens_per_step
                )
                measured[side].append(tps)
                print(
                    f"{shape} round {round_index + 1} {side}: {tps:,.0f} tokens/s (load {os.getloadavg()[0]:.1f})",
                    file=sys.stderr,
                )
        model_vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
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
    run_cli(main)  # a usage error is one line, as in every command
