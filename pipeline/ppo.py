"""PPO: the SFT model is optimised against the reward model, held near itself by a KL penalty (TRL PPOTrainer).

    accelerate launch pipeline/ppo.py --config configs/tiny/ppo.yaml --run_name demo
    python pipeline/ppo.py --preset tiny --run_name demo --kl_coef 0.1 --stop_on_collapse
    python pipeline/ppo.py --preset tiny --run_name demo --model_name_or_path runs/a/sft --reward_model_path runs/b/reward
    python pipeline/ppo.py --preset tiny --run_name demo --use_peft          # LoRA policy; the reference is the adapter switched off

Policy and reference come from runs/<run_name>/sft (or --model_name_or_path; TRL's --sft_model_path is an alias), reward and value models from
runs/<run_name>/reward (or --reward_model_path / --value_model_path). Prompts are the built-in tasks'
(or --dataset conversations' prompts), rendered with the chat template, left-padded; replies stop at
<|end|> (the chat tokenizer's EOS, distinct from the pad token) and lose --missing_eos_penalty reward
when they never stop. Writes the policy as a plain causal LM with tokenizer and generation config,
metrics.json (task accuracy and mean reward before/after, KL), eval.json, log_history.json, train.log
to runs/<run_name>/ppo.

PPO cannot resume: TRL's PPOTrainer saves only the policy in a checkpoint (no value model, optimizer or
data position), so `--save_steps` checkpoints are snapshots to inspect or chat with, and `--resume` is
refused; an interrupted PPO stage is rerun with `--overwrite` (run_all.py does so).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Before TRL is imported: it warns about its experimental modules at import time.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from accelerate import PartialState  # noqa: E402
from transformers import ProgressCallback  # noqa: E402
from trl.experimental.ppo import PPOTrainer  # noqa: E402

from fluxchat import (  # noqa: E402
    arguments,
    chat_format,
    evaluation,
    hub,
    loading,
    rl_monitor,
    runs,
    stage_data,
    training,
)
from fluxchat.cli import fail, run_cli  # noqa: E402
from fluxchat.config import parse_config  # noqa: E402
from fluxchat.report import before_after_metrics, measure_policy  # noqa: E402
from fluxchat.stage_arguments import ARGUMENTS  # noqa: E402

KL_PROMPTS = 64  # training prompts the final KL is measured on when the data has no held-out task items


def main(argv: list[str] | None = None) -> Path:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if any(a == "--resume" or a.startswith("--resume=") for a in argv):
        fail(
            "--resume: PPO cannot continue from a checkpoint (TRL's PPOTrainer saves the policy only); rerun the stage with --overwrite"
        )
    script_args, peft_args, args, config_file = parse_config("ppo", ARGUMENTS["ppo"], argv)
    if (
        script_args.model_name_or_path
        and args.sft_model_path
        and script_args.model_name_or_path != args.sft_model_path
    ):
        fail("--model_name_or_path and --sft_model_path name the same input (the policy): give one of them")
    run = training.plan_stage(args, "ppo", overwrite=script_args.overwrite)
    push_request = hub.take_over_push(args)  # we push the finished folder once, not every checkpoint

    run_name = training.run_name(args)
    policy_flag = (
        "--sft_model_path" if args.sft_model_path and not script_args.model_name_or_path else "--model_name_or_path"
    )
    sft_path = runs.resolve_input(script_args.model_name_or_path or args.sft_model_path, run_name, "sft")
    reward_path = runs.resolve_input(args.reward_model_path, run_name, "reward")
    value_path = (
        runs.resolve_input(script_args.value_model_path, run_name, "reward")
        if script_args.value_model_path
        else reward_path
    )
    tokenizer = loading.load_chat_tokenizer(sft_path)
    for flag, path in (("--reward_model_path", reward_path), ("--value_model_path", value_path)):
        loading.check_same_tokenizer(tokenizer, path, flag)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        fail(
            f"{policy_flag} {sft_path}: its tokenizer's pad token == EOS, which corrupts PPO's masks; retrain the tokenizer with a <|pad|> token"
        )
    context = loading.context_with_room(sft_path, "--response_length", args.response_length)
    if args.stop_token is None and args.stop_token_id is None:
        args.stop_token = "eos"  # the chat tokenizer's EOS is <|end|>: replies end where a turn ends
    conversations = stage_data.load_conversations(script_args)
    conversations = stage_data.sample_rows(conversations, script_args.max_train_samples, args.seed)
    train_set, counts = stage_data.prompt_dataset(tokenizer, conversations, context - args.response_length)
    # A reply cut at the limit is one the reward model ranks low (it learned cut-short replies are the rejected ones)
    # however right it was.
    evaluation.note_answer_fit(
        tokenizer,
        [c["messages"][-1]["content"] for c in conversations if c["messages"][-1]["role"] == "assistant"],
        args.response_length,
        "--response_length",
        "conversations' replies",
        cut="the policy's replies to them are cut before they can end, and scored as cut",
    )
    # TRL's rollout loader drops a short last batch and repeats itself forever: with fewer prompts than one rollout
    # it yielded nothing, and PPO hung at its first step.
    processes = PartialState().num_processes  # PPOConfig's own world_size is filled in by the trainer, later
    rollout = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    if len(train_set) < rollout:
        fail(
            f"{len(train_set)} usable prompt(s), but one rollout takes {rollout} (--per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x --gradient_accumulation_steps {args.gradient_accumulation_steps}"
            f"{f' x {processes} processes' if processes > 1 else ''}): add prompts, or lower those"
        )
    examples = stage_data.task_examples(script_args)
    eval_set = (
        stage_data.prompt_dataset(tokenizer, examples, context - args.response_length)[0]
        if examples
        else train_set.select(range(min(8, len(train_set))))
    )
    probe = [chat_format.prompt_of(c["messages"]) for c in (examples or conversations)[: script_args.probe_prompts]]
    policy = loading.load_causal_lm(sft_path, tokenizer)
    reference = None if peft_args.use_peft else loading.load_causal_lm(sft_path, tokenizer)  # must be a separate copy
    reward_model = loading.load_score_model(reward_path, tokenizer, "--reward_model_path")
    value_model = loading.load_score_model(value_path, tokenizer)

    peft_config = arguments.lora_config(peft_args, "CAUSAL_LM", policy)
    training.start_stage(
        run, args, script_args, peft_args, args, config_file=config_file, model=policy, tokenizer=tokenizer
    )
    training.logger.info(
        f"ppo: policy {sft_path}, reward {reward_path}, value {value_path}; {counts['prompts']} prompts "
        f"({counts['trimmed']} trimmed, {counts['dropped_too_long']} dropped as too long), replies up to {args.response_length} tokens"
    )

    def measure(model) -> dict:
        return measure_policy(model, tokenizer, examples, script_args.eval_max_new_tokens, reward_model)

    before = measure(policy) if script_args.eval_baseline else {}
    tokenizer.padding_side = "left"  # PPOTrainer generates from a batch of prompts
    monitor = rl_monitor.PPOMonitor(
        tokenizer,
        probe,
        args.response_length,
        script_args.max_kl,
        script_args.min_eos_rate,
        script_args.max_repetition,
        script_args.stop_on_collapse,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        train_dataset=train_set,
        value_model=value_model,
        eval_dataset=eval_set,
        callbacks=[monitor.callback()],
        peft_config=peft_config,
    )
    monitor.trainer = trainer
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(rl_monitor.ppo_progress())
    start = time.perf_counter()
    try:
        training.train(trainer, run)
    except rl_monitor.TrainingCollapsed as err:
        training.finish_stage(trainer, run, {"stopped_early": str(err)}, {}, finished=False)
        fail(f"PPO stopped at {err}; nothing marked finished (see {run.work_dir / runs.LOG_FILE})")
    seconds = time.perf_counter() - start
    tokenizer.padding_side = "right"

    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    policy = training.save_model(trainer, policy, tokenizer, run.work_dir, peft_args.merge_adapter, direct=True)
    after = measure(policy)
    # The KL of the policy saved, measured on its own sampled replies: TRL's log holds one rollout's noisy estimate
    # per update (the last one was this figure before, and came out negative at times).
    kl_prompts = examples or [chat_format.prompt_of(c["messages"]) for c in conversations[:KL_PROMPTS]]
    kl_reference = reference if reference is not None else loading.load_causal_lm(sft_path, tokenizer)
    kl = evaluation.policy_kl(policy, kl_reference, tokenizer, kl_prompts, args.response_length, args.temperature)
    updates = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    if updates:
        kl["training_log"] = {"first_update": updates[0]["objective/kl"], "last_update": updates[-1]["objective/kl"]}
    report = {**after, "kl": kl, "before": before, "warnings": monitor.warnings}
    metrics = {
        **training.train_metrics(None, seconds),
        **before_after_metrics(before, after),
        "kl": kl.get("mean"),
        "kl_interval": kl.get("interval"),
        "updates": trainer.state.global_step,
        "episodes": trainer.state.episode,
        "data": counts,
        "models": {"sft": sft_path, "reward": reward_path, "value": value_path},
    }
    training.finish_stage(trainer, run, metrics, report, push_request=push_request)
    reward_change = ""
    if before and after:
        reward_change = f", mean reward {before['reward']['mean_reward']:.3f} -> {after['reward']['mean_reward']:.3f}"
    summary = f"held-out tasks {evaluation.summarize_tasks(after.get('tasks', {}))}{reward_change}"
    if kl:
        low, high = kl["interval"]
        summary += f", KL to SFT {kl['mean']:.3f} ({low:.3f} to {high:.3f}, n={kl['n']} sampled replies)"
    training.say_done(trainer, run, "ppo", trainer.state.global_step, seconds, summary, unit="updates")
    return run.output_dir


if __name__ == "__main__":
    run_cli(main)
