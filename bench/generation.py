"""Generation speed at batch 1: first-token latency and tokens/s, with and without the KV cache.

    python bench/generation.py                        # tiny preset and gpt2-small shapes, 128 new tokens
    python bench/generation.py --new_tokens 256 --threads 2
    python bench/generation.py --smoke

Random-initialised GPT2LMHeadModel of each shape (speed does not depend on the weights), greedy decoding
through `model.generate` with `min_new_tokens` so every run produces exactly the same number of tokens.
First-token latency is a whole `generate(max_new_tokens=1)` call on a 16-token prompt (median of 5).
"""

from __future__ import annotations

import statistics
import time

import common

from fluxchat.cli import run_cli

SHAPES = {
    "tiny": None,  # read from configs/tiny/pretrain.yaml + configs/tiny/tokenizer.yaml
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
}
SMOKE = dict(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=512)
PROMPT_TOKENS = 16


def shape_config(name: str, smoke: bool) -> dict:
    if smoke:
        return SMOKE
    if SHAPES[name] is not None:
        return SHAPES[name]
    from fluxchat.config import CONFIGS_DIR, load_yaml

    pre, tok = load_yaml(CONFIGS_DIR / "tiny" / "pretrain.yaml"), load_yaml(CONFIGS_DIR / "tiny" / "tokenizer.yaml")
    return dict(
        n_layer=pre["n_layer"],
        n_embd=pre["n_embd"],
        n_head=pre["n_head"],
        n_positions=pre["block_size"],
        vocab_size=tok["vocab_size"],
    )


def timed_generate(model, prompt, new_tokens: int, use_cache: bool) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def main() -> None:
    args = common.parser("generation", __doc__)
    args.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args.add_argument("--new_tokens", type=int, default=128)
    args = args.parse_args()
    threads = common.set_threads(args.threads)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    new_tokens = 8 if args.smoke else args.new_tokens
    repeats = 1 if args.smoke else 5
    rows = []
    for name in args.shapes:
        shape = shape_config(name, args.smoke)
        new = min(new_tokens, shape["n_positions"] - PROMPT_TOKENS)
        torch.manual_seed(0)
        config = GPT2Config(**shape, activation_function="gelu_pytorch_tanh")  # as pipeline.pretraining.build_model
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").eval()
        prompt = torch.randint(shape["vocab_size"], (1, PROMPT_TOKENS))
        timed_generate(model, prompt, 2, True)  # warm-up: first calls allocate and pick kernels
        for use_cache in (True, False):
            first = statistics.median(timed_generate(model, prompt, 1, use_cache) for _ in range(repeats))
            total = statistics.median(
                timed_generate(model, prompt, new, use_cache) for _ in range(max(1, repeats // 2))
            )
            rows.append(
                {
                    "shape": name,
                    "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                    "kv_cache": use_cache,
                    "prompt_tokens": PROMPT_TOKENS,
                    "new_tokens": new,
                    "first_token_ms": round(1000 * first, 2),
                    "tokens_per_s": round(new / total, 1),
                }
            )
        rows.append(
            {
                "shape": name,
                "kv_cache": "speed-up",
                "tokens_per_s": round(rows[-2]["tokens_per_s"] / rows[-1]["tokens_per_s"], 2),
            }
        )
    common.print_table(f"Generation, batch 1, greedy ({threads} threads)", rows)
    common.write_results(args.output, "generation", rows, args.smoke, threads=threads)


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
