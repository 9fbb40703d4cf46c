"""Pretraining tokens/s and MFU: pipeline/pretrain.py (transformers' Trainer) against a plain PyTorch loop.

    python bench/pretrain_throughput.py                      # tiny preset + nanoGPT's CPU shape, 5 rounds each
    python bench/pretrain_throughput.py --shapes tiny --rounds 5 --steps 100
    python bench/pretrain_throughput.py --smoke              # seconds; checks it runs

Both sides train the same GPT2LMHeadModel (pipeline.pretraining.build_model) on the same tokens (tinyshakespeare's
first 90%), batch, context, torch threads, AdamW settings and warm-up + cosine schedule, and are run
alternately (pipeline, plain, pipeline, plain, ...) so both see the same machine load. The pipeline
side is the real `pretrain.main()`; only steps after `--warmup` are timed, evaluation is off while timed.
The plain loop is nanoGPT's: random windows, forward, backward, clip, AdamW (torch's CPU default), step.
MFU uses nanoGPT's estimate (6N + 12*L*d*T FLOPs per token) against the best fp32 matmul FLOP/s measured here.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import common

from fluxchat import pretraining

SHAPES = {
    # name: (tokenizer, model/batch overrides of configs/tiny/pretrain.yaml)
    "tiny": (("bpe", None), {}),
    "nanogpt-cpu": (("char", 400), dict(n_layer=4, n_embd=128, n_head=4, block_size=64, per_device_train_batch_size=12,
                                        learning_rate=1e-3, warmup_steps=100, adam_beta2=0.99, weight_decay=0.1, dropout=0.0)),
}
SMOKE_SHAPE = dict(n_layer=2, n_embd=64, n_head=2, block_size=32, per_device_train_batch_size=4)


def settings_for(shape: str, smoke: bool) -> tuple[dict, tuple]:
    from fluxchat.config import CONFIGS_DIR, load_yaml

    (tok_type, vocab), overrides = SHAPES[shape]
    tok_cfg = load_yaml(CONFIGS_DIR / "tiny" / "tokenizer.yaml")
    settings = {**load_yaml(CONFIGS_DIR / "tiny" / "pretrain.yaml"), **overrides, **(SMOKE_SHAPE if smoke else {})}
    return settings, (tok_type, vocab or tok_cfg.get("vocab_size", 1024))


def pipeline_run(text: Path, tokenizer_dir: Path, settings: dict, total_steps: int, out: Path, extra: tuple = ()) -> list[float]:
    from pipeline import pretrain

    timer = common.step_timer()
    flags = [f"--{k}={settings[k]}" for k in ("n_layer", "n_embd", "n_head", "block_size", "per_device_train_batch_size",
                                              "learning_rate", "warmup_steps", "adam_beta2", "weight_decay", "dropout")]
    argv = ["--preset", "tiny", "--train_file", str(text), "--tokenizer_name_or_path", str(tokenizer_dir),
            "--output_dir", str(out), "--overwrite", "--max_steps", str(total_steps), "--eval_strategy", "no",
            "--save_strategy", "no", "--sample_prompts", "ROMEO:", "--sample_max_new_tokens", "8", *flags, *extra]
    with common.trainer_callbacks(timer), contextlib.redirect_stdout(sys.stderr):
        pretrain.main(argv)
    return timer.step_ends


def plain_run(text: Path, tokenizer_dir: Path, settings: dict, total_steps: int) -> tuple[list[float], object]:
    import torch
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from fluxchat.data import load_text

    torch.manual_seed(settings.get("seed", 1337))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_docs, _ = load_text([str(text)], None, "text", 0.1)
    tokens = pretraining.tokenize_documents(tokenizer, train_docs)
    model_args = SimpleNamespace(model_name_or_path=None, pad_vocab_to_multiple_of=0, attn_implementation="sdpa",
                                 **{k: settings[k] for k in ("n_layer", "n_embd", "n_head", "block_size", "dropout")})
    model = pretraining.build_model(model_args, tokenizer)
    block, batch = settings["block_size"], settings["per_device_train_batch_size"]
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases and LayerNorms, as the Trainer
    optimizer = torch.optim.AdamW(groups, lr=settings["learning_rate"], betas=(0.9, settings["adam_beta2"]), eps=1e-8)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings["warmup_steps"], total_steps)
    model.train()
    step_ends = []
    for _ in range(total_steps):
        offsets = torch.randint(len(tokens) - block, (batch,))
        x = torch.stack([tokens[i : i + block] for i in offsets])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_ends.append(time.perf_counter())
    return step_ends, model


def tokens_per_second(step_ends: list[float], warmup: int, tokens_per_step: int) -> float:
    timed = step_ends[warmup - 1 :]
    return (len(timed) - 1) * tokens_per_step / (timed[-1] - timed[0])


def main() -> None:
    args = common.parser("pretrain_throughput", __doc__)
    args.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args.add_argument("--rounds", type=int, default=5, help="Pipeline/plain pairs per shape, alternating.")
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
        measured = {"pipeline": [], "plain": []}
        model = None
        for round_index in range(args.rounds):
            # alternate which side goes first, so a drift in machine load does not favour one side
            order = ["pipeline", "plain"] if round_index % 2 == 0 else ["plain", "pipeline"]
            for side in order:
                if side == "pipeline":
                    ends = pipeline_run(text, tokenizer_dir, settings, total, work / f"run-{shape}")
                else:
                    ends, model = plain_run(text, tokenizer_dir, settings, total)
                measured[side].append(tokens_per_second(ends, args.warmup, tokens_per_step))
                print(f"{shape} round {round_index + 1} {side}: {measured[side][-1]:,.0f} tokens/s", file=sys.stderr)
        flops_per_token = common.gpt2_flops_per_token(common.non_embedding_params(model), settings["n_layer"], settings["n_embd"], settings["block_size"])
        for side, values in measured.items():
            median = statistics.median(values)
            rows.append({
                "shape": shape, "side": side, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                "tokens_per_step": tokens_per_step, "tokens_per_s": round(median, 1),
                "runs_tokens_per_s": [round(v) for v in values], "mfu_pct": round(100 * flops_per_token * median / peak, 2),
            })
        # Each round's pipeline run against the plain run next to it (same machine state), then the median:
        # steadier than the ratio of the two sides' medians when the machine's speed drifts between rounds.
        ratios = [pipe / plain for pipe, plain in zip(measured["pipeline"], measured["plain"])]
        rows.append({"shape": shape, "side": "ratio pipeline/plain", "tokens_per_s": round(statistics.median(ratios), 3),
                     "runs_tokens_per_s": [round(r, 3) for r in ratios]})
    common.print_table(f"Pretraining throughput ({threads} threads, peak {peak / 1e9:.0f} GFLOP/s fp32)", rows,
                       ["shape", "side", "params_M", "tokens_per_step", "tokens_per_s", "mfu_pct", "runs_tokens_per_s"])
    common.write_results(args.output, "pretrain_throughput", rows, args.smoke, peak_flops=peak, rounds=args.rounds,
                         warmup_steps=args.warmup, timed_steps=args.steps)


if __name__ == "__main__":
    main()
