"""Pretrain a GPT-2-style model from scratch with transformers' Trainer.

    accelerate launch pipeline/pretrain.py --config configs/tiny/pretrain.yaml --run_name demo
    python pipeline/pretrain.py --preset tiny --run_name demo --train_file ../shared/data/pretrain/tinyshakespeare.txt
    torchrun --nproc_per_node 2 pipeline/pretrain.py --preset tiny --run_name ddp      # 2 CPU processes (gloo)
    python pipeline/pretrain.py --preset tiny --run_name demo --resume                  # continue the newest checkpoint

Reads the tokenizer from runs/<run_name>/tokenizer (or --tokenizer_name_or_path), writes the model,
tokenizer, generation config, metrics.json and train.log to runs/<run_name>/pretrain (or --output_dir).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainingArguments, default_data_collator, set_seed

from fluxchat import data, generation, hub, loading, pretraining, runs, shards, training
from fluxchat.arguments import DataArguments, ModelArguments
from fluxchat.cli import fail, run_cli
from fluxchat.config import parse_config

DEFAULT_PROMPTS = ["ROMEO:\n", "To be, or not to be", "First Citizen:\n"]


def main(argv: list[str] | None = None) -> Path:
    model_args, data_args, args, config_file = parse_config(
        "pretrain", (ModelArguments, DataArguments, TrainingArguments), argv
    )
    if args.ddp_find_unused_parameters is None:
        # GPT-2 uses every weight each step; the Trainer's default (True) made DDP walk the autograd graph again
        # every step and warn so from each process.
        args.ddp_find_unused_parameters = False
    run = training.plan_stage(args, "pretrain", overwrite=data_args.overwrite, resume=data_args.resume)
    push_request = hub.take_over_push(args)  # we push the finished folder once, not every checkpoint

    # A model continued from its own folder brings its tokenizer: the run's (runs/default/tokenizer unless
    # --run_name) was demanded instead, and could be another one with as many tokens, its ids meaning other text.
    tokenizer_source = model_args.tokenizer_name_or_path or pretraining.own_tokenizer(model_args.model_name_or_path)
    tokenizer_path = runs.resolve_input(tokenizer_source, training.run_name(args), "tokenizer")
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
