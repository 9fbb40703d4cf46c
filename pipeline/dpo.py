"""DPO: the SFT model learns to prefer the chosen reply of each pair over the rejected one, relative to a
frozen copy of itself, with no reward model and no sampling (TRL DPOTrainer).

    accelerate launch pipeline/dpo.py --config configs/tiny/dpo.yaml --run_name demo
    python pipeline/dpo.py --preset tiny --run_name demo --dataset builtin ../shared/data/pref/hh-rlhf_helpful-base_test.jsonl.gz
    python pipeline/dpo.py --preset tiny --run_name demo --dataset runs/demo/feedback.jsonl --beta 0.2
    python pipeline/dpo.py --preset tiny --run_name demo --use_peft          # LoRA policy; the reference is the adapter switched off
    python pipeline/dpo.py --preset tiny --run_name demo --mix_text_file runs/demo/data/facts_mix.txt   # + its LM loss

Reads runs/<run_name>/sft (or --model_name_or_path): the policy, and again as the reference model.
Pairs: the built-in tasks' train pairs, hh-rlhf transcripts, TRL preference files (explicit or implicit
prompt, text or conversational) and the app's feedback file ({conversation, chosen, rejected}). Writes the
policy with tokenizer and generation config, metrics.json (implicit-reward accuracy on held-out pairs with
a 95% interval, held-out task accuracy before/after), eval.json, log_history.json and train.log to
runs/<run_name>/dpo.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from trl import DPOTrainer

from fluxchat import arguments, evaluation, hub, loading, runs, stage_data, training
from fluxchat.cli import main_process, run_cli
from fluxchat.config import parse_config
from fluxchat.report import before_after_metrics, describe_pairs, measure_policy, wilson_interval
from fluxchat.stage_arguments import ARGUMENTS


class RenderedDPOTrainer(DPOTrainer):
    """DPOTrainer on pairs already tokenized by `stage_data.dpo_pair_dataset`: TRL would render them with the Jinja
    template, which turns typed control-token spellings into control tokens and ends each reply with the separator.

    With `mix_text` (the ids of --mix_text_file) every training batch of pairs adds the language-modelling loss of
    `mix_rows` random windows of that text, times `mix_weight`: InstructGPT's PPO-ptx term, for DPO. The chain
    mixes in the facts prose, as SFT does; without it DPO answered follow-up questions with another country's city
    or a garbled figure (issue 14: on validation countries 86.4% right after SFT, 77.6% and 79.6% after DPO for two
    seeds)."""

    def __init__(self, *args, mix_text=None, mix_weight: float = 1.0, mix_rows: int = 8, mix_window: int = 64, **kw):
        super().__init__(*args, **kw)
        self.mix_text, self.mix_weight, self.mix_rows = mix_text or [], mix_weight, mix_rows
        self.mix_window = min(mix_window, len(self.mix_text), self.args.max_length)
        # Each process draws its own windows; the generator is saved with each checkpoint (below).
        self.mix_rng = random.Random(f"{self.args.seed}:dpo_mix_text:{self.accelerator.process_index}")

    def _mix_rng_file(self, checkpoint) -> Path:
        return Path(checkpoint) / f"rng_state_mix_text_{self.args.process_index}.pth"

    def _save_rng_state(self, output_dir):
        # The Trainer saves and restores only the global generators: without this one a resumed run drew its text
        # windows from the start again, and trained on other windows than the uninterrupted run.
        super()._save_rng_state(output_dir)
        if self.mix_text:
            torch.save(self.mix_rng.getstate(), self._mix_rng_file(output_dir))

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if self.mix_text and checkpoint and self._mix_rng_file(checkpoint).is_file():  # none in a run without text
            self.mix_rng.setstate(torch.load(self._mix_rng_file(checkpoint), weights_only=True))

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not (self.mix_text and self.mix_weight and model.training):  # evaluation scores the pairs alone
            return out
        starts = [self.mix_rng.randrange(len(self.mix_text) - self.mix_window + 1) for _ in range(self.mix_rows)]
        ids = torch.tensor([self.mix_text[s : s + self.mix_window] for s in starts], device=self.accelerator.device)
        text_loss = model(input_ids=ids, labels=ids).loss
        # Logged with TRL's own DPO metrics, averaged over the processes as they are. The logged `loss` is the sum.
        self._metrics["train"]["mix_text_loss"].append(self.accelerator.gather(text_loss.detach()[None]).mean().item())
        if return_outputs:
            loss, outputs = out
            return loss + self.mix_weight * text_loss, outputs
        return out + self.mix_weight * text_loss


def _sequence_logps(model, inputs) -> torch.Tensor:
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    token_logps = torch.gather(logits.log_softmax(-1), 2, inputs["input_ids"][:, 1:, None]).squeeze(2)
    return (token_logps * inputs["completion_mask"][:, 1:]).sum(1)


@torch.no_grad()
def implicit_rewards(trainer, dataset, pairs: list[dict], batch_size: int = 32) -> dict:
    """DPO's implicit reward, beta * (log pi(y|x) - log pi_ref(y|x)), of each pair's chosen and rejected reply:
    accuracy (chosen above rejected) and mean margin, counted pair by pair (TRL's eval metrics average per batch)."""
    if not pairs:
        return {}
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    device, margins = loading.device_of(model), []
    for start in range(0, len(dataset), batch_size):
        inputs = trainer.data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        inputs = {key: value.to(device) for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        policy = _sequence_logps(model, inputs)
        if trainer.ref_model is not None:
            reference = _sequence_logps(trainer.ref_model, inputs)
        else:  # LoRA: the reference is the model with its adapter switched off
            with model.disable_adapter():
                reference = _sequence_logps(model, inputs)
        chosen, rejected = (trainer.beta * (policy - reference)).chunk(2)
        margins += (chosen - rejected).tolist()
    model.train(was_training)
    wins = [margin > 0 for margin in margins]
    low, high = wilson_interval(sum(wins), len(wins))
    result = {
        "accuracy": sum(wins) / len(wins),
        "low": low,
        "high": high,
        "margin": sum(margins) / len(margins),
        "n": len(wins),
        "ties": sum(margin == 0 for margin in margins),  # a policy still equal to its reference ties every pair
    }
    return {**result, **evaluation.pair_groups(pairs, wins)}


def main(argv: list[str] | None = None) -> Path:
    script_args, peft_args, args, config_file = parse_config("dpo", ARGUMENTS["dpo"], argv)
    run = training.plan_stage(args, "dpo", overwrite=script_args.overwrite, resume=script_args.resume)
    run_name = training.run_name(args)
    push_request = hub.take_over_push(args)  # we push the finished folder once, not every checkpoint
    if args.precompute_ref_log_probs and args.world_size > 1:
        # TRL computes them on every process but writes them to a cache file on the main one only, in the folder of
        # its in-memory dataset, which is each process's own temporary folder: the others failed to open it (a
        # FileNotFoundError traceback from every process) once every earlier stage of a 2-process chain had run.
        args.precompute_ref_log_probs = False
        if main_process():
            print(
                f"note: --precompute_ref_log_probs off with {args.world_size} processes: the reference model scores "
                "each batch as it trains instead (slower, the same loss)",
                file=sys.stderr,
            )

    sft_path = runs.resolve_input(script_args.model_name_or_path, run_name, "sft")
    tokenizer = loading.load_chat_tokenizer(sft_path)
    context = loading.context_length(loading.load_config(sft_path))
    args.max_length = min(args.max_length or context, context)
    train_pairs, heldout_pairs, n_identical = stage_data.split_preferences(
        script_args, script_args.eval_fraction, args.seed
    )
    train_set, counts, _ = stage_data.dpo_pair_dataset(tokenizer, train_pairs, args.max_length)
    heldout_set, heldout_counts, heldout_pairs = stage_data.dpo_pair_dataset(
        tokenizer, heldout_pairs, args.max_length, held_out=True
    )
    builtin_pairs = stage_data.task_pairs(
        script_args
    )  # the reward stage's: quote/speaker only where a play feeds them
    builtin_set, _, builtin_pairs = (
        stage_data.dpo_pair_dataset(tokenizer, builtin_pairs, args.max_length) if builtin_pairs else (None, {}, [])
    )
    examples = stage_data.task_examples(script_args)
    stage_data.note_no_mix_text(script_args, "mix_text_weight")
    mix_text = stage_data.read_mix_text(tokenizer, script_args.mix_text_file) if script_args.mix_text_file else None

    policy = loading.load_causal_lm(sft_path, tokenizer)  # before writing anything: a broken input leaves no trace
    # The reference is the SFT model reloaded from its folder: a separate object (TRL refuses the policy itself).
    reference = None if peft_args.use_peft else loading.load_causal_lm(sft_path, tokenizer)
    peft_config = arguments.lora_config(peft_args, "CAUSAL_LM", policy)
    training.start_stage(
        run, args, script_args, peft_args, args, config_file=config_file, model=policy, tokenizer=tokenizer
    )
    training.logger.info(
        f"dpo: policy and reference {sft_path} (context {context}), beta {args.beta}, loss {'+'.join(args.loss_type)}; "
        f"{counts['pairs']} train pairs ({counts['trimmed']} trimmed, {counts['dropped_too_long']} dropped as too long, "
        f"{n_identical} dropped with chosen == rejected{stage_data.same_once_tokenized(counts)}), {heldout_counts['pairs']} held out, {len(builtin_pairs)} built-in held-out pairs"
    )
    before = {}
    if script_args.eval_baseline and not run.resume_from:
        before = measure_policy(policy, tokenizer, examples, script_args.eval_max_new_tokens)
    if before:
        training.logger.info(f"before dpo: held-out tasks {evaluation.summarize_tasks(before['tasks'])}")

    trainer = RenderedDPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=train_set,
        eval_dataset=heldout_set if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        mix_text=mix_text,
        mix_weight=script_args.mix_text_weight,
        mix_rows=script_args.mix_text_rows,
        mix_window=script_args.mix_text_window,
    )
    if mix_text and script_args.mix_text_weight:
        training.logger.info(
            f"dpo: plus the language-modelling loss of {script_args.mix_text_file} ({len(mix_text)} tokens) at weight "
            f"{script_args.mix_text_weight:g}, {trainer.mix_rows} windows of {trainer.mix_window} tokens a batch of pairs"
        )
    training.use_dense_progress(trainer)
    start = time.perf_counter()
    result = training.train(trainer, run)
    seconds = time.perf_counter() - start

    # Before saving: a LoRA policy is merged on save, and its reference is the adapter switched off.
    preferences = {
        "builtin": implicit_rewards(trainer, builtin_set, builtin_pairs),
        "heldout": implicit_rewards(trainer, heldout_set, heldout_pairs),
    }
    if len(script_args.dataset) > 1:
        preferences["heldout_by_source"] = {
            source: implicit_rewards(trainer, *_subset(heldout_set, heldout_pairs, source))
            for source in script_args.dataset
        }
    policy = training.save_model(trainer, trainer.model, tokenizer, run.work_dir, peft_args.merge_adapter)
    after = measure_policy(policy, tokenizer, examples, script_args.eval_max_new_tokens)
    report = {**after, "preferences": preferences, "before": before}
    metrics = {
        **training.train_metrics(result, seconds),
        "reward_accuracy": preferences["builtin"].get("accuracy"),
        "reward_margin": preferences["builtin"].get("margin"),
        "reward_accuracy_by_flaw": preferences["builtin"].get("per_flaw"),
        "heldout_accuracy": preferences["heldout"].get("accuracy"),
        **before_after_metrics(before, after),
        "data": {
            "train": counts,
            "heldout": heldout_counts,
            "dropped_identical": n_identical,
            "sources": script_args.dataset,
        },
        "model": sft_path,
    }
    training.finish_stage(trainer, run, metrics, report, push_request=push_request)
    summary = (
        f"implicit-reward accuracy: built-in held-out pairs {describe_pairs(preferences['builtin'])}; held-out given pairs "
        f"{describe_pairs(preferences['heldout'])}; held-out tasks {evaluation.summarize_tasks(after.get('tasks', {}))}"
    )
    training.say_done(trainer, run, "dpo", result.global_step, seconds, summary)
    return run.output_dir


def _subset(dataset, pairs: list[dict], source: str):
    keep = [i for i, pair in enumerate(pairs) if pair.get("source") == source]
    return dataset.select(keep), [pairs[i] for i in keep]


if __name__ == "__main__":
    run_cli(main)
