"""Supervised fine-tuning: a pretrained model learns to answer in the chat format (TRL SFTTrainer).

    accelerate launch pipeline/sft.py --config configs/tiny/sft.yaml --run_name demo
    python pipeline/sft.py --preset tiny --run_name demo --inspect          # one example, loss tokens in [[...]]
    python pipeline/sft.py --preset tiny --run_name demo --dataset builtin ../shared/data/sft/dolly_open_qa.instruction_response.jsonl
    python pipeline/sft.py --preset tiny --run_name demo --model_name_or_path runs/other/pretrain --chat_format instruction
    python pipeline/sft.py --preset tiny --run_name demo --use_peft --lora_r 8          # LoRA, merged on save
    python pipeline/sft.py --preset tiny --run_name demo --resume                       # continue the newest checkpoint

Reads runs/<run_name>/pretrain (or --model_name_or_path), writes the chat model, its tokenizer (chat
template, <|end|> as EOS), metrics.json, eval.json, log_history.json and train.log to runs/<run_name>/sft.
Loss is on assistant replies and their end-of-turn token only: we tokenize with
chat_format.render_conversations and hand SFTTrainer `input_ids` + `labels` (-100 off the replies).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from trl import SFTTrainer

from fluxchat import arguments, chat_format, evaluation, formats, hub, loading, runs, stage_data, training
from fluxchat.cli import run_cli
from fluxchat.config import parse_config
from fluxchat.stage_arguments import ARGUMENTS


def inspect(tokenizer, train_set, counts) -> None:
    masks = [[int(label != stage_data.IGNORE_INDEX) for label in labels] for labels in train_set["labels"]]
    multi_turn = [
        i for i, mask in enumerate(masks[:500]) if sum(1 for a, b in zip([0] + mask, mask) if b and not a) > 1
    ]
    index = multi_turn[0] if multi_turn else 0
    loss_tokens = sum(sum(mask) for mask in masks)
    all_tokens = sum(len(mask) for mask in masks)
    print(
        f"{counts['examples']} examples ({counts['trimmed']} trimmed, {counts['dropped_too_long']} dropped as too long), "
        f"{all_tokens:,} tokens, {loss_tokens / all_tokens:.0%} carry loss; example {index}, loss tokens in [[...]]:"
    )
    print(stage_data.marked_example(tokenizer, train_set[index]["input_ids"], masks[index]))


def main(argv: list[str] | None = None) -> Path:
    script_args, peft_args, args, config_file = parse_config("sft", ARGUMENTS["sft"], argv)
    if script_args.inspect:  # writes nothing: no output folder to check
        run = training.StageRun(
            "sft", training.resolve_output_dir(args, "sft"), training.resolve_output_dir(args, "sft")
        )
    else:
        run = training.plan_stage(args, "sft", overwrite=script_args.overwrite, resume=script_args.resume)
    push_request = hub.take_over_push(args)  # we push the finished folder once, not every checkpoint

    model_path = runs.resolve_input(script_args.model_name_or_path, training.run_name(args), "pretrain")
    tokenizer = loading.load_chat_tokenizer(model_path, script_args.chat_format, add_missing_tokens=True)
    format_name = chat_format.format_of(tokenizer).name
    context = loading.context_length(loading.load_config(model_path))
    args.max_length = min(args.max_length or context, context)
    conversations = stage_data.load_conversations(script_args)
    conversations = stage_data.sample_rows(conversations, script_args.max_train_samples, args.seed)
    held_out = []
    if script_args.eval_fraction and args.eval_strategy != "no" and len(conversations) > 1:
        conversations, held_out = formats.split_heldout(conversations, script_args.eval_fraction, args.seed)
        if not held_out:
            print(
                "note: every held-out conversation is also a training conversation (the data repeats them): no eval loss",
                file=sys.stderr,
            )
    train_set, counts = stage_data.sft_dataset(tokenizer, conversations, args.max_length)
    stage_data.note_no_mix_text(script_args, "mix_text_fraction")
    if script_args.mix_text_file and script_args.mix_text_fraction:
        train_set, counts["text_rows"] = stage_data.mix_text_rows(
            train_set,
            tokenizer,
            script_args.mix_text_file,
            script_args.mix_text_fraction,
            min(script_args.mix_text_window, args.max_length),
            args.seed,
        )
    if script_args.inspect:
        inspect(tokenizer, train_set, counts)
        return run.output_dir
    eval_set = stage_data.sft_dataset(tokenizer, held_out, args.max_length, required=False)[0] if held_out else None
    if held_out and eval_set is None:  # rows that fit are for training; an eval loss is a nice-to-have
        print(
            f"note: none of the {len(held_out)} held-out conversations fits the context of {args.max_length} tokens: no eval loss",
            file=sys.stderr,
        )
    if eval_set is None:
        args.eval_strategy = "no"
    examples = stage_data.task_examples(script_args)
    model = loading.load_causal_lm(model_path, tokenizer)

    peft_config = arguments.lora_config(peft_args, "CAUSAL_LM", model)
    training.start_stage(
        run, args, script_args, peft_args, args, config_file=config_file, model=model, tokenizer=tokenizer
    )
    training.logger.info(
        f"sft: {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, context {context}), "
        f"chat format {format_name}, {counts['examples']} train conversations ({counts['trimmed']} trimmed, "
        f"{counts['dropped_too_long']} dropped as too long), {len(eval_set) if eval_set else 0} held out for eval loss"
    )
    baseline = {}
    if script_args.eval_baseline and not run.resume_from:
        baseline = evaluation.evaluate_policy(model, tokenizer, examples, script_args.eval_max_new_tokens)
        training.logger.info(f"before sft: held-out tasks {evaluation.summarize_tasks(baseline)}")

    # Our labels already restrict the loss to assistant tokens; TRL's own flag wants raw messages.
    args.assistant_only_loss = False
    if not args.packing:  # our rows are trainer-ready (labels built, every row fits): TRL's preparation is a no-op
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    training.use_dense_progress(trainer)
    start = time.perf_counter()
    result = training.train(trainer, run)
    seconds = time.perf_counter() - start

    model = training.save_model(trainer, trainer.model, tokenizer, run.work_dir, peft_args.merge_adapter)
    report = {"tasks": evaluation.evaluate_policy(model, tokenizer, examples, script_args.eval_max_new_tokens)}
    if baseline:
        report["before"] = {"tasks": baseline}
    metrics = {
        **training.train_metrics(result, seconds),
        "task_accuracy": report["tasks"].get("overall"),
        "task_accuracy_before": baseline.get("overall"),
        "data": counts,
        "model": model_path,
        "chat_format": format_name,
    }
    training.finish_stage(trainer, run, metrics, report, push_request=push_request)
    summary = f"held-out tasks {evaluation.summarize_tasks(report['tasks'])}"
    training.say_done(trainer, run, "sft", result.global_step, seconds, summary)
    return run.output_dir


if __name__ == "__main__":
    run_cli(main)
