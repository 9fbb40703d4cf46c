"""GPU pretraining throughput: a GPT-2-small-sized model in bf16 through pipeline/pretrain.py, tokens/s and MFU.

    python bench/gpu.py                          # 12 layers x 768, context 1024, batch 16, bf16 (issue 6 aim: >= 45% MFU on an H100)
    python bench/gpu.py --batch 32 --compile     # torch.compile via TrainingArguments
    python bench/gpu.py --smoke                  # on a machine without a GPU: prints why it skipped

Our byte-level BPE tokenizer (vocab 8192, trained on tinyshakespeare) replaces GPT-2's 50257, so the
model has fewer embedding parameters than gpt2-small; MFU counts the model actually trained
(nanoGPT's 6N + 12*L*d*T FLOPs per token) against the device's dense bf16 peak (a table of known
devices, else a measured bf16 matmul).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import common

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, dropout=0.0, learning_rate=6e-4,
                  warmup_steps=10, adam_beta2=0.95, weight_decay=0.1)


def device_peak(name: str) -> tuple[float, str]:
    for key, peak in DENSE_BF16_PEAK.items():
        if key in name:
            return peak, f"{key} datasheet dense bf16"
    import torch

    return common.measured_peak_flops(0, size=8192, dtype=torch.bfloat16, device="cuda"), "measured bf16 matmul"


def main() -> None:
    args = common.parser("gpu", __doc__)
    args.add_argument("--batch", type=int, default=16)
    args.add_argument("--steps", type=int, default=30, help="Timed steps (after --warmup).")
    args.add_argument("--warmup", type=int, default=10)
    args.add_argument("--compile", action="store_true", help="torch_compile=true in the Trainer.")
    args = args.parse_args()
    import torch

    if not torch.cuda.is_available():
        row = {"device": "none", "status": "skipped: no CUDA GPU on this machine (torch.cuda.is_available() is False)"}
        common.print_table("GPU pretraining throughput", [row])
        common.write_results(args.output, "gpu", [row], args.smoke, skipped=True)
        return
    from pretrain_throughput import pipeline_run, tokens_per_second

    name = torch.cuda.get_device_name(0)
    peak, peak_source = device_peak(name)
    settings = {**GPT2_SMALL, "per_device_train_batch_size": args.batch}
    if args.smoke:
        settings.update(n_layer=2, block_size=128, per_device_train_batch_size=2)
        args.steps, args.warmup = 3, 2
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    tokenizer_dir = common.train_tokenizer(work / "tok", "bpe", 8192)
    extra = ("--bf16", "true", "--torch_compile", str(args.compile).lower(), "--pad_vocab_to_multiple_of", "64",
             "--dataloader_pin_memory", "true", "--logging_steps", "10")
    from transformers import AutoModelForCausalLM

    runs = []
    for _ in range(2):
        ends = pipeline_run(common.SHAKESPEARE, tokenizer_dir, settings, args.warmup + args.steps, work / "run", extra)
        runs.append(tokens_per_second(ends, args.warmup, settings["per_device_train_batch_size"] * settings["block_size"]))
        print(f"{name}: {runs[-1]:,.0f} tokens/s", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(work / "run")
    flops_per_token = common.gpt2_flops_per_token(common.non_embedding_params(model), settings["n_layer"], settings["n_embd"], settings["block_size"])
    median = statistics.median(runs)
    row = {"device": name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "precision": "bf16",
           "compile": args.compile, "batch": settings["per_device_train_batch_size"], "context": settings["block_size"],
           "tokens_per_s": round(median), "mfu_pct": round(100 * flops_per_token * median / peak, 1), "peak": peak_source}
    common.print_table("GPU pretraining throughput (pipeline/pretrain.py)", [row])
    common.write_results(args.output, "gpu", [row], args.smoke, runs_tokens_per_s=[round(r) for r in runs])


if __name__ == "__main__":
    main()
