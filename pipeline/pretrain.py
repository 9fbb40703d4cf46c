"""Pretrain a GPT-2-style model from scratch with transformers' Trainer.

    accelerate launch pipeline/pretrain.py --config configs/tiny/pretrain.yaml --run_name demo
    python pipeline/pretrain.py --preset tiny --run_name demo --train_file ../shared/data/pretrain/tinyshakespeare.txt
    torchrun --nproc_per_node 2 pipeline/pretrain.py --preset tiny --run_name ddp      # 2 CPU processes (gloo)
    python pipeline/pretrain.py --preset tiny --run_name demo --resume                  # continue the newest checkpoint

Reads the tokenizer from runs/<run_name>/tokenizer (or --tokenizer_name_or_path), writes the model,
tokenizer, generation config, metrics.json and train.log to runs/<run_name>/pretrain (or --output_dir).
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainingArguments, default_data_collator, set_seed

from fluxchat import arguments, data, generation, hub, loading, pretraining, runs, shards, training
from fluxchat.cli import fail, run_cli
from fluxchat.config import parse_config

DEFAULT_PROMPTS = ["ROMEO:\n", "To be, or not to be", "First Citizen:\n"]
# GPT-2's attention implementations in transformers 5 -> (module, pip package) each needs beyond torch.
ATTENTION_PACKAGES = {
    "sdpa": None,
    "eager": None,
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
}


@dataclass
class ModelArguments:
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; default runs/<run_name>/tokenizer."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from this causal LM instead of a fresh GPT-2."}
    )
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks."})
    n_embd: int = field(default=128, metadata={"help": "Hidden width."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (must divide n_embd)."})
    block_size: int = field(default=128, metadata={"help": "Context length in tokens (GPT-2's n_positions)."})
    dropout: float = field(
        default=0.0, metadata={"help": "For pretraining 0 is good; for small data and many epochs try 0.1+."}
    )
    pad_vocab_to_multiple_of: int = field(
        default=0, metadata={"help": "Round the embedding up (64 helps GPUs); 0 = exact."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "sdpa (fused attention), eager, or flash_attention_2/3 (CUDA, with the flash-attn package)."
        },
    )

    def __post_init__(self):
        # Below 1, check_numbers' range line says so (here it would be a ZeroDivisionError).
        if self.n_head >= 1 and self.n_embd % self.n_head:
            raise ValueError(f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}")
        if self.attn_implementation not in ATTENTION_PACKAGES:
            raise ValueError(
                f"--attn_implementation {self.attn_implementation!r}: choose from {', '.join(ATTENTION_PACKAGES)}"
            )
        package = ATTENTION_PACKAGES[self.attn_implementation]
        # transformers can also take flash attention from the `kernels` package; without either it fails mid-load.
        if package and not any(importlib.util.find_spec(name) for name in (package[0], "kernels")):
            raise ValueError(
                f"--attn_implementation {self.attn_implementation} needs the {package[1]} package "
                f"(pip install {package[1]}, CUDA only); or use sdpa"
            )


@dataclass
class DataArguments:
    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "Text files/folders (.txt/.jsonl/.parquet); default the shipped tinyshakespeare (data/)."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (or local dataset folder) instead of files."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The Hub dataset's configuration (e.g. wikitext-103-raw-v1)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "The Hub dataset's split to read."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the Hub dataset into token shards without downloading it whole first."},
    )
    text_column: str = field(default="text", metadata={"help": "Column with text for jsonl/parquet/Hub data."})
    validation_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Held-out tail of each text file (nanoGPT: the last tenth); streamed: every 1/fraction-th document."
        },
    )
    token_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where token shards are cached; default $FLUXCHAT_CACHE/tokens (~/.cache/fluxchat/tokens)."},
    )
    tokenize_threads: int = field(
        default=0, metadata={"help": "Threads tokenizing a new corpus (the tokenizer's own); 0 = one per CPU core."}
    )
    sample_prompts: list[str] | None = field(default=None, metadata={"help": "Prompts sampled after each evaluation."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of those samples (0: no samples)."})
    resume: bool = arguments.resume_field()
    overwrite: bool = arguments.overwrite_field()


# What --preset's pretrain.yaml and the flags fill (tests parse every preset's recipe with it).
ARGUMENTS = (ModelArguments, DataArguments, TrainingArguments)


def main(argv: list[str] | None = None) -> Path:
    model_args, data_args, args, config_file = parse_config("pretrain", ARGUMENTS, argv)
    if args.ddp_find_unused_parameters is None:
        # GPT-2 uses every weight each step; the Trainer's default (True) made DDP walk the autograd graph again
        # every step and warn so from each process.
        args.ddp_find_unused_parameters = False
    run = training.plan_stage(args, "pretrain", overwrite=data_args.overwrite, resume=data_args.resume)
    push_request = hub.take_over_push(args)  # we push the finished folder once, not every checkpoint

    tokenizer_path = runs.resolve_input(model_args.tokenizer_name_or_path, training.run_name(args), "tokenizer")
    tokenizer = loading.load_tokenizer(tokenizer_path)
    sources = data.text_sources(
        data_args.train_file,
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.dataset_split,
        data_args.streaming,
    )
    with PartialState().local_main_process_first():  # one process per machine tokenizes, the others read its cache
        corpus = shards.load_or_build(
            tokenizer,
            sources,
            data_args.text_column,
            data_args.validation_fraction,
            Path(data_args.token_cache_dir or shards.default_cache_root()),
            data_args.tokenize_threads or os.cpu_count() or 1,
        )
    train_tokens, val_tokens = corpus.train, corpus.validation
    set_seed(args.seed)  # the Trainer seeds only after the model exists: without this, init ignores --seed
    model = pretraining.build_model(model_args, tokenizer)
    tokenizer.model_max_length = model_args.block_size  # saved with the model; set after tokenizing whole documents
    if corpus.max_id >= model.config.vocab_size:
        fail(
            f"tokenizer {tokenizer_path} produces id {corpus.max_id} but the model's vocab_size is {model.config.vocab_size}"
        )
    if model_args.block_size > model.config.n_positions:
        fail(
            f"--block_size {model_args.block_size} is longer than the model's context ({model.config.n_positions} positions)"
        )
    block_size = model_args.block_size
    if val_tokens is not None and len(val_tokens) <= block_size:
        # Else validation, asked for with --validation_fraction, would silently not happen: no held-out bits/byte.
        fail(
            f"the validation text is only {len(val_tokens):,} tokens, not longer than one block (--block_size "
            f"{block_size}): lower --block_size, raise --validation_fraction, or pass --validation_fraction 0"
        )
    accounting = pretraining.RankAccounting()
    train_set = pretraining.RandomWindows(train_tokens, block_size, accounting)
    eval_set = pretraining.Blocks(val_tokens, block_size) if val_tokens is not None else None
    if eval_set is None:
        args.eval_strategy = "no"
    # Only the loss is reported: without this the Trainer keeps every evaluated block's logits
    # (blocks x context x vocab floats: 84 MB for 160 blocks at vocab 1024), growing with the held-out text.
    args.prediction_loss_only = True
    bytes_per_token = corpus.validation_bytes / len(val_tokens) if eval_set else 1.0

    training.start_stage(
        run, args, model_args, data_args, args, config_file=config_file, model=model, tokenizer=tokenizer
    )
    n_params = sum(p.numel() for p in model.parameters())
    world = args.world_size
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * block_size * world
    length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)"
    training.logger.info(
        f"pretrain: {n_params / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, context {block_size}, "
        f"{len(train_tokens):,} train / {0 if val_tokens is None else len(val_tokens):,} val tokens "
        f"from {data.describe_sources(sources)}, "
        f"{tokens_per_step:,} tokens/step x {length}, {world} process(es) x {torch.get_num_threads()} thread(s), "
        f"{'bf16 autocast' if args.bf16 else 'fp16 autocast' if args.fp16 else 'fp32'}"
    )

    trainer = pretraining.BitsPerByteTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=default_data_collator,  # blocks are full-length: the tokenizer's padding collator only costs time
        bytes_per_token=bytes_per_token,
    )
    progress = training.use_dense_progress(trainer, tokens_per_step)
    trainer.add_callback(
        pretraining.SampleCallback(
            tokenizer, data_args.sample_prompts or DEFAULT_PROMPTS, data_args.sample_max_new_tokens
        )
    )

    start = time.perf_counter()
    result = training.train(trainer, run)
    train_seconds = time.perf_counter() - start
    # With load_best_model_at_end (the small preset) the weights saved are the best checkpoint's, so are its figures:
    # the last step's loss and step count described a model that was not the one saved.
    best = trainer.state.best_model_checkpoint if args.load_best_model_at_end else None
    final_step = runs.checkpoint_step(best) if best else result.global_step
    evals = [e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == final_step]
    final_eval = evals[-1] if evals else (trainer.evaluate() if eval_set is not None else {})
    ranks = training.gather_rank_info(accounting.summary())

    model.generation_config = generation.generation_config(tokenizer)
    # weights (safetensors), config, tokenizer, generation config
    training.save_final(trainer, run.work_dir, lambda folder: trainer.save_model(str(folder)))
    metrics = {
        **training.train_metrics(result, train_seconds),
        **final_eval,
        "parameters": n_params,
        # On training time, as the log lines measure it; the wall figure also holds evaluations, samples and
        # checkpoints. Both over this session's steps: after a --resume the steps before it took no time here.
        "tokens_per_second": progress.tokens_per_second(),
        "tokens_per_second_wall": round(
            (result.global_step - training.resumed_step(run)) * tokens_per_step / max(train_seconds, 1e-9), 1
        ),
        "global_step": result.global_step,
        "ranks": ranks,
        "sources": [source.name for source in sources],
        **({"best_step": final_step} if best else {}),
    }
    training.finish_stage(trainer, run, metrics, push_request=push_request)
    if trainer.is_world_process_zero():
        bpb = final_eval.get("eval_bits_per_byte")
        kept = f" (the best checkpoint's, step {final_step}, whose weights are saved)" if best else ""
        print(
            f"pretrain done: {result.global_step} steps in {train_seconds:.0f}s, val bits/byte "
            f"{bpb if bpb is None else round(bpb, 3)}{kept} -> {run.output_dir}"
        )
    return run.output_dir


if __name__ == "__main__":
    run_cli(main)
