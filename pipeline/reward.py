"""Reward model: the SFT model with a one-logit head learns which of two replies is preferred (TRL RewardTrainer).

    accelerate launch pipeline/reward.py --config configs/tiny/reward.yaml --run_name demo
    python pipeline/reward.py --preset tiny --run_name demo --dataset builtin ../shared/data/pref/hh-rlhf_helpful-base_test.jsonl.gz
    python pipeline/reward.py --preset tiny --run_name demo --model_name_or_path runs/other/sft --output_dir runs/demo/reward2
    python pipeline/reward.py --preset tiny --run_name demo --use_peft                   # LoRA + trainable score head, merged on save

Reads runs/<run_name>/sft (or --model_name_or_path), writes an AutoModelForSequenceClassification
(num_labels=1) with the tokenizer, metrics.json, eval.json, log_history.json and train.log to
runs/<run_name>/reward. Reports accuracy and margin (chosen minus rejected reward) on the built-in
held-out pairs and on a held-out part of the given data (e.g. hh-rlhf).
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import set_seed
from trl import RewardTrainer

from fluxchat import arguments, evaluation, hub, loading, runs, stage_data, training
from fluxchat.cli import run_cli
from fluxchat.config import parse_config
from fluxchat.report import describe_pairs
from fluxchat.stage_arguments import ARGUMENTS


def score_pairs(model, tokenizer, pairs) -> dict:
    if not pairs:
        return {}
    return evaluation.evaluate_reward_model(evaluation.on_device(model), tokenizer, pairs)  # in eval mode, restored


def main(argv: list[str] | None = None) -> Path:
    script_args, peft_args, args, config_file = parse_config("reward", ARGUMENTS["reward"], argv)
    run = training.plan_stage(args, "reward", overwrite=script_args.overwrite)
    push_request = hub.take_over_push(args)  # we push the finished folder once, not every checkpoint

    model_path = runs.resolve_input(script_args.model_name_or_path, training.run_name(args), "sft")
    tokenizer = loading.load_chat_tokenizer(model_path)
    context = loading.context_length(loading.load_config(model_path))
    args.max_length = min(args.max_length or context, context)
    train_pairs, heldout_pairs, n_identical = stage_data.split_preferences(
        script_args, script_args.eval_fraction, args.seed
    )
    train_set, counts, _ = stage_data.preference_dataset(tokenizer, train_pairs, args.max_length)
    eval_set, eval_counts, heldout_pairs = stage_data.preference_dataset(
        tokenizer, heldout_pairs, args.max_length, held_out=True
    )
    builtin_pairs = stage_data.task_pairs(script_args)  # the tasks that can run here (see evaluable_tasks)
    if args.eval_strategy == "no":
        eval_set = None
    set_seed(args.seed)  # the new score head's initialisation
    model = loading.load_score_model(model_path, tokenizer)

    peft_config = arguments.lora_config(peft_args, "SEQ_CLS", model)
    training.start_stage(
        run, args, script_args, peft_args, args, config_file=config_file, model=model, tokenizer=tokenizer
    )
    training.logger.info(
        f"reward: {model_path} (context {context}), {counts['pairs']} train pairs ({counts['trimmed']} trimmed, "
        f"{counts['dropped_too_long']} dropped as too long, {n_identical} dropped with chosen == rejected{stage_data.same_once_tokenized(counts)}), "
        f"{eval_counts['pairs']} held out"
    )
    baseline = {}
    if script_args.eval_baseline:  # an untrained head: accuracy should be near chance
        baseline = {
            "builtin": score_pairs(model, tokenizer, builtin_pairs),
            "heldout": score_pairs(model, tokenizer, heldout_pairs),
        }

    trainer = RewardTrainer(
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
    report = {
        "builtin": score_pairs(model, tokenizer, builtin_pairs),
        "heldout": score_pairs(model, tokenizer, heldout_pairs),
    }
    if len(script_args.dataset) > 1:
        report["heldout_by_source"] = {
            source: score_pairs(model, tokenizer, [p for p in heldout_pairs if p["source"] == source])
            for source in script_args.dataset
        }
    if baseline:
        report["before"] = baseline
    data_counts = {
        "train": counts,
        "heldout": eval_counts,
        "dropped_identical": n_identical,
        "sources": script_args.dataset,
    }
    metrics = {
        **training.train_metrics(result, seconds),
        "reward_accuracy": report["builtin"].get("accuracy"),
        "reward_margin": report["builtin"].get("margin"),
        "reward_accuracy_by_flaw": report["builtin"].get("per_flaw"),  # "wrong" near 50%: it judges form only
        "heldout_accuracy": report["heldout"].get("accuracy"),
        "data": data_counts,
        "model": model_path,
    }
    training.finish_stage(trainer, run, metrics, report, push_request=push_request)
    summary = (
        f"pair accuracy: built-in held-out pairs {describe_pairs(report['builtin'])}; "
        f"held-out given pairs {describe_pairs(report['heldout'])}"
    )
    training.say_done(trainer, run, "reward", result.global_step, seconds, summary)
    return run.output_dir


if __name__ == "__main__":
    run_cli(main)
