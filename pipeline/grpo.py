"""GRPO: the SFT model samples a group of replies per prompt and learns from their rewards relative to each
other, held near itself by a KL penalty (TRL GRPOTrainer). Rewards are verifiable: the built-in tasks'
exact checkers, a format reward, optionally a trained reward model, or a user's answers.

    accelerate launch pipeline/grpo.py --config configs/tiny/grpo.yaml --run_name demo
    python pipeline/grpo.py --preset tiny --run_name demo --train_tasks arithmetic --num_generations 8 --beta 0.04
    python pipeline/grpo.py --preset tiny --run_name demo --reward_model_path runs/demo/reward --reward_model_weight 0.5
    python pipeline/grpo.py --preset tiny --run_name demo --dataset my_prompts.jsonl --answer_match contains
    python pipeline/grpo.py --preset tiny --run_name demo --use_peft          # LoRA policy; the reference is the adapter switched off

Reads runs/<run_name>/sft (or --model_name_or_path). Prompts are the built-in tasks' train split (their
held-out items are never trained on) and/or .jsonl/.json/.parquet files with a `prompt` (text or messages)
or `messages` column and an `answer` column (checked by normalised exact match or containment). Replies
stop at <|end|> (the chat tokenizer's EOS). Writes the policy as a plain causal LM with tokenizer and
generation config, metrics.json (held-out task accuracy before/after with 95% intervals, reward, KL),
eval.json, log_history.json and train.log to runs/<run_name>/grpo.
"""

from __future__ import annotations

import time
from pathlib import Path

from datasets import Dataset
from trl import GRPOTrainer

from fluxchat import arguments, evaluation, hub, loading, rewards, rl_monitor, runs, stage_data, tasks, training
from fluxchat.cli import fail, run_cli
from fluxchat.config import parse_config
from fluxchat.report import before_after_metrics, measure_policy
from fluxchat.stage_arguments import ARGUMENTS, GRPOArguments


def prompt_rows(script_args: GRPOArguments, has_reward_model: bool) -> list[dict]:
    """{prompt, answer, match, task} rows from the --dataset sources, in order."""
    rows = []
    for source in script_args.dataset:
        if source == "builtin":
            rows += rewards.builtin_prompts(
                tasks.conversations(
                    "train",
                    n=script_args.builtin_examples,
                    corpus_file=script_args.corpus_file,
                    tasks=script_args.train_tasks or script_args.tasks,
                    task_weights=script_args.builtin_weights,
                )
            )
        else:
            rows += rewards.load_prompt_file(source, script_args.answer_match, need_answers=not has_reward_model)
    return rows


def main(argv: list[str] | None = None) -> Path:
    script_args, peft_args, args, config_file = parse_config("grpo", ARGUMENTS["grpo"], argv)
    run = training.plan_stage(args, "grpo", overwrite=script_args.overwrite, resume=script_args.resume)
    run_name = training.run_name(args)
    push_request = hub.take_over_push(args)  # we push the finished folder once, not every checkpoint

    sft_path = runs.resolve_input(script_args.model_name_or_path, run_name, "sft")
    reward_path = (
        runs.resolve_input(script_args.reward_model_path, run_name, "reward")
        if script_args.reward_model_path
        else None
    )
    stage_data.note_unused_setting(
        script_args, "reward_model_weight", "reward_model_path", "weighs nothing", "give a reward stage's folder"
    )
    tokenizer = loading.load_chat_tokenizer(sft_path)
    if reward_path:
        loading.check_same_tokenizer(tokenizer, reward_path, "--reward_model_path")
    context = loading.context_with_room(sft_path, "--max_completion_length", args.max_completion_length)

    rows = stage_data.sample_rows(
        prompt_rows(script_args, reward_path is not None), script_args.max_train_samples, args.seed
    )
    rows, counts = stage_data.grpo_prompt_rows(tokenizer, rows, context - args.max_completion_length)
    evaluation.note_answer_fit(
        tokenizer,
        [row["answer"] for row in rows if row.get("answer")],
        args.max_completion_length,
        "--max_completion_length",
        "prompts' answers",
        cut="their replies are cut before the answer ends and never rewarded",
        unknown="no reply can match them, so they are never rewarded",
    )
    # TRL samples whole batches of distinct prompts and drops a short last one: with fewer prompts it trained no step
    # at all and saved the SFT model unchanged as this stage, exit 0.
    prompts_per_batch = args.generation_batch_size // args.num_generations
    if len(rows) < prompts_per_batch:
        fail(
            f"{len(rows)} usable prompt(s), but each generation batch samples {prompts_per_batch} different ones "
            f"({args.generation_batch_size} replies in groups of --num_generations {args.num_generations}): add prompts, "
            f"or lower --per_device_train_batch_size or --steps_per_generation"
        )
    train_set = Dataset.from_list(rows)
    examples = stage_data.task_examples(script_args)

    policy = loading.load_causal_lm(sft_path, tokenizer)  # before writing anything: a broken input leaves no trace
    reward_model = loading.load_score_model(reward_path, tokenizer, "--reward_model_path") if reward_path else None
    reward_funcs, weights = rewards.weighted_rewards(
        tokenizer, reward_model, script_args.answer_weight, script_args.format_weight, script_args.reward_model_weight
    )
    args.reward_weights = weights

    peft_config = arguments.lora_config(peft_args, "CAUSAL_LM", policy)
    training.start_stage(
        run, args, script_args, peft_args, args, config_file=config_file, model=policy, tokenizer=tokenizer
    )
    names = [rewards.training_name(func) for func in reward_funcs]
    training.logger.info(
        f"grpo: policy {sft_path}{f', reward model {reward_path}' if reward_path else ''}; {counts['prompts']} prompts "
        f"({counts['trimmed']} trimmed, {counts['dropped_too_long']} dropped as too long, {counts['dropped_control_text']} with "
        f"control-token text), groups of {args.num_generations} replies up to {args.max_completion_length} tokens at temperature "
        f"{args.temperature}, beta {args.beta}, rewards {' + '.join(f'{w:g} x {n}' for w, n in zip(weights, names))}"
    )

    def measure(model) -> dict:
        return measure_policy(model, tokenizer, examples, script_args.eval_max_new_tokens, reward_model)

    before = measure(policy) if script_args.eval_baseline and not run.resume_from else {}
    if before:
        training.logger.info(f"before grpo: held-out tasks {evaluation.summarize_tasks(before['tasks'])}")
    if reward_model is not None:
        evaluation.on_device(reward_model).eval()  # a plain callable to TRL: it does not place it
    tokenizer.padding_side = "left"  # GRPOTrainer generates from a left-padded batch of prompts
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    training.positions_from_attention_mask(trainer.model, trainer.ref_model)  # it scores left-padded prompts
    training.use_dense_progress(trainer)
    start = time.perf_counter()
    result = training.train(trainer, run)
    seconds = time.perf_counter() - start
    tokenizer.padding_side = "right"

    policy = training.save_model(trainer, trainer.model, tokenizer, run.work_dir, peft_args.merge_adapter)
    after = measure(policy)
    trend = rl_monitor.grpo_trend(trainer.state.log_history, args.logging_steps)
    report = {**after, "before": before, "training": trend, "rewards": dict(zip(names, weights))}
    metrics = {
        **training.train_metrics(result, seconds),
        **before_after_metrics(before, after),
        "train_reward": trend.get("reward", {}).get("last"),
        "kl": trend.get("kl", {}).get("last"),
        "data": counts,
        "models": {"sft": sft_path, "reward": reward_path},
    }
    training.finish_stage(trainer, run, metrics, report, push_request=push_request)
    summary = f"held-out tasks {evaluation.summarize_tasks(after.get('tasks', {}))}"
    if before:
        summary += f" (before: {evaluation.summarize_tasks(before['tasks'])})"
    training.say_done(trainer, run, "grpo", result.global_step, seconds, summary)
    return run.output_dir


if __name__ == "__main__":
    run_cli(main)
