"""What the three alignment stages (sft.py, reward.py, ppo.py) share.

- Loading the previous stage: the tokenizer with its chat format (SFT picks the format, later stages
  inherit it) and the model as a causal LM or a one-logit reward/value model.
- Token-id datasets built with `chat_format.render_conversation`, the renderer chat uses, so the
  layout a model is trained on is exactly the one it later answers in, and typed control-token
  spellings in the data stay plain text. Over-long conversations lose their oldest whole turns.
- LoRA through peft, merged back into a plain model on save so the next stage needs no peft.
- The end of a stage: the model saved with its tokenizer and generation config, evaluation results
  in metrics.json/eval.json, the Trainer's log history, and the finished marker written last.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import chat_format, runs, training
from pipeline.config import fail

logger = logging.getLogger("fluxchat")


@dataclass
class StageArguments:
    """Fields every alignment stage has."""

    dataset: list[str] = field(default_factory=lambda: ["builtin"], metadata={"help": "Data sources to mix: 'builtin' (generated tasks), local .jsonl/.json/.parquet files, or Hub dataset ids."})
    corpus_file: str | None = field(default=None, metadata={"help": "Text corpus the built-in quote/speaker tasks draw lines from; default tinyshakespeare (cached download)."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Built-in tasks to train and evaluate on; default all (quote speaker arithmetic copy upper capital followup)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows (a seeded sample); default all."})
    eval_examples: int = field(default=140, metadata={"help": "Held-out built-in examples scored at the end of the stage (balanced across tasks)."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Reply length limit when scoring held-out tasks."})
    eval_baseline: bool = field(default=True, metadata={"help": "Also score the input model before training, so metrics.json shows what the stage changed."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished run in the output folder."})

    def __post_init__(self):
        if not self.dataset:
            raise ValueError("--dataset needs at least one source (e.g. builtin)")
        if self.eval_examples < 0 or self.eval_max_new_tokens < 1:
            raise ValueError("--eval_examples must be >= 0 and --eval_max_new_tokens >= 1")


@dataclass
class PeftArguments:
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Module names to adapt; default all linear layers (GPT-2: c_attn c_proj c_fc)."})
    merge_adapter: bool = field(default=True, metadata={"help": "Save the adapter merged into a plain model, so the next stage and chat load it without peft."})

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha < 1 or not 0 <= self.lora_dropout < 1:
            raise ValueError("--lora_r and --lora_alpha must be >= 1 and --lora_dropout in [0, 1)")


def lora_config(peft_args: PeftArguments, task_type: str):
    """A peft LoraConfig, or None without --use_peft. task_type SEQ_CLS keeps the new score head trainable."""
    if not peft_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=peft_args.lora_r,
        lora_alpha=peft_args.lora_alpha,
        lora_dropout=peft_args.lora_dropout,
        target_modules=peft_args.lora_target_modules or "all-linear",
        task_type=task_type,
    )


# ---------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path: str, chat_format_name: str | None = None, add_missing_tokens: bool = False):
    """The tokenizer at `path` as a chat tokenizer: our special tokens present, a chat template set,
    and <|end|> as EOS. `chat_format_name` None keeps the format the tokenizer already carries.

    A tokenizer from outside the pipeline (e.g. the Hub's gpt2) lacks our tokens: SFT may add them
    (`add_missing_tokens`; the model's embeddings grow to match in `load_causal_lm`), later stages refuse.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        fail(f"could not load a tokenizer from {path}: {str(err).splitlines()[0][:200]}")
    missing = [t for t in chat_format.SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing and not add_missing_tokens:
        fail(f"tokenizer in {path} lacks the chat tokens {' '.join(missing)}: give a model that went through pipeline/sft.py")
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        logger.info(f"added chat tokens {' '.join(missing)} to the tokenizer of {path}")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = chat_format.PAD  # PPO masks on ids != pad: pad must differ from EOS
    name = chat_format_name or chat_format.format_of(tokenizer).name
    chat_format.set_chat_format(tokenizer, name, chat_model=True)
    tokenizer.padding_side = "right"
    return tokenizer


def model_context(config) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    fail(f"cannot tell the context length of a {type(config).__name__} model")


def _align_config(model, tokenizer) -> None:
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id


def load_causal_lm(path: str, tokenizer):
    from pipeline import lm, loading

    model = loading.load_model(path).train()  # no vocab check: _align_config resizes for added chat tokens
    _align_config(model, tokenizer)
    model.generation_config = lm.generation_config(tokenizer)
    return model


def load_score_model(path: str, tokenizer):
    """A model with one scalar output per sequence (reward or value), read at the last non-pad token."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, use_safetensors=True)
    except Exception as err:  # OSError, SafetensorError (half-written weights), ValueError, ...
        fail(f"could not load a reward model from {path}: {str(err).splitlines()[0][:200]}")
    _align_config(model, tokenizer)
    return model


def check_same_tokenizer(tokenizer, other_path: str, what: str) -> None:
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(other_path)
    if other.get_vocab() != tokenizer.get_vocab():
        fail(f"{what} {other_path} uses a different tokenizer than the policy: train it from the same SFT model")


# ---------------------------------------------------------------------------------------------------
# Datasets


def fit_messages(tokenizer, messages, max_tokens: int, generation_prompt: bool = False, reserve: int = 0):
    """`messages` with the oldest whole turns dropped until render + `reserve` fits `max_tokens`
    (a leading system message stays); None when even the newest turn does not fit. Chat trims the
    same way at inference (chat_format.trim_to_context), so training sees what chat will show."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = list(messages[len(system):])
    while True:
        ids, _ = chat_format.render_conversation(tokenizer, system + rest, add_generation_prompt=generation_prompt)
        if len(ids) + reserve <= max_tokens:
            return system + rest
        starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
        if len(starts) <= 1:
            return None
        rest = rest[starts[1]:]


def sft_dataset(tokenizer, conversations: list[dict], max_length: int):
    """Dataset with `input_ids` and `assistant_masks` (1 on assistant content + its end-of-turn token).

    SFTTrainer turns the mask into labels (-100 elsewhere). Returns (dataset, counts)."""
    from datasets import Dataset

    columns = {"input_ids": [], "assistant_masks": []}
    counts = {"examples": 0, "trimmed": 0, "dropped_too_long": 0, "dropped_no_reply": 0}
    # The separator after the last turn carries no loss and, the model being causal, changes nothing before it.
    separator = len(chat_format.encode_text(tokenizer, chat_format.format_of(tokenizer).separator))

    def render(messages):
        ids, mask = chat_format.render_conversation(tokenizer, messages)
        return ids[: len(ids) - separator], mask[: len(mask) - separator]

    for conversation in conversations:
        messages = conversation["messages"]
        ids, mask = render(messages)
        if len(ids) > max_length:
            messages = fit_messages(tokenizer, messages, max_length + separator)
            if messages is None:
                counts["dropped_too_long"] += 1
                continue
            counts["trimmed"] += 1
            ids, mask = render(messages)
        if not any(mask):
            counts["dropped_no_reply"] += 1
            continue
        columns["input_ids"].append(ids)
        columns["assistant_masks"].append(mask)
        counts["examples"] += 1
    if not counts["examples"]:
        fail(f"no conversation fits the model's context of {max_length} tokens ({counts}): use shorter data or a model with a longer context")
    return Dataset.from_dict(columns), counts


def preference_dataset(tokenizer, pairs: list[dict], max_length: int):
    """Dataset with `chosen_ids` / `rejected_ids` for RewardTrainer. Over-long prompts lose their
    oldest turns; a pair whose replies alone do not fit is dropped. Returns (dataset, counts)."""
    from datasets import Dataset

    columns = {"chosen_ids": [], "rejected_ids": []}
    counts = {"pairs": 0, "trimmed": 0, "dropped_too_long": 0}
    for pair in pairs:
        prompt = list(pair.get("prompt") or [])
        chosen = chat_format.render_scored(tokenizer, prompt + pair["chosen"])
        rejected = chat_format.render_scored(tokenizer, prompt + pair["rejected"])
        if max(len(chosen), len(rejected)) > max_length:
            prompt_length = len(chat_format.render_prompt(tokenizer, prompt)) if prompt else 0
            reply_length = max(len(chosen), len(rejected)) - prompt_length
            prompt = fit_messages(tokenizer, prompt, max_length, generation_prompt=True, reserve=reply_length) if prompt else None
            if prompt is None:
                counts["dropped_too_long"] += 1
                continue
            counts["trimmed"] += 1
            chosen = chat_format.render_scored(tokenizer, prompt + pair["chosen"])
            rejected = chat_format.render_scored(tokenizer, prompt + pair["rejected"])
        columns["chosen_ids"].append(chosen)
        columns["rejected_ids"].append(rejected)
        counts["pairs"] += 1
    if not counts["pairs"]:
        fail(f"no preference pair fits the model's context of {max_length} tokens ({counts})")
    return Dataset.from_dict(columns), counts


def prompt_of(messages) -> list[dict]:
    """The messages before the final assistant reply: what a policy is asked to continue."""
    messages = list(messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def prompt_dataset(tokenizer, conversations: list[dict], max_prompt_tokens: int):
    """Dataset with one column `input_ids`: each conversation's prompt rendered with the generation
    prompt (PPOTrainer's format). Returns (dataset, counts)."""
    from datasets import Dataset

    prompts = []
    counts = {"prompts": 0, "trimmed": 0, "dropped_too_long": 0, "dropped_empty": 0}
    for conversation in conversations:
        messages = prompt_of(conversation["messages"])
        if not messages or messages[-1]["role"] != "user":
            counts["dropped_empty"] += 1
            continue
        fitted = fit_messages(tokenizer, messages, max_prompt_tokens, generation_prompt=True)
        if fitted is None:
            counts["dropped_too_long"] += 1
            continue
        counts["trimmed"] += fitted != messages
        prompts.append(chat_format.render_prompt(tokenizer, fitted))
        counts["prompts"] += 1
    if not prompts:
        fail(f"no prompt fits in {max_prompt_tokens} tokens (context minus --response_length) ({counts})")
    return Dataset.from_dict({"input_ids": prompts}), counts


def sample_rows(rows: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(rows):
        return rows
    import random

    return random.Random(seed).sample(rows, limit)


def marked_example(tokenizer, input_ids, mask) -> str:
    """One training example as text with the loss-bearing tokens inside [[...]]."""
    pieces, run, run_mask = [], [], None
    for token, bit in list(zip(input_ids, mask)) + [(None, None)]:
        if bit != run_mask and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"[[{text}]]" if run_mask else text)
            run = []
        run_mask = bit
        if token is not None:
            run.append(token)
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------------
# Saving and reporting


def save_model(trainer, model, tokenizer, output_dir: Path, merge_adapter: bool, direct: bool = False):
    """Save `model` (+ tokenizer with chat template + generation config) so AutoModel... loads it.

    A LoRA model is merged first unless --merge_adapter false (then only the adapter is saved, and
    loading it needs peft). `direct` saves `model` itself from the main process instead of going
    through trainer.save_model (PPO: its save_model cannot find the policy inside a DDP wrapper).
    Returns the model to evaluate."""
    from pipeline import lm

    is_peft = hasattr(model, "merge_and_unload")
    if is_peft and merge_adapter:
        model = model.merge_and_unload()
    if getattr(model, "can_generate", lambda: False)():  # PPOTrainer leaves its own stop settings in it
        model.generation_config = lm.generation_config(tokenizer)
    def save(folder: Path) -> None:
        if direct or (is_peft and merge_adapter):
            if trainer.is_world_process_zero():
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
        else:
            trainer.save_model(str(folder))  # on every process: sharded (DeepSpeed/FSDP) saves gather across them

    training.save_final(trainer, output_dir, save)
    return model


def load_conversations(stage_args: StageArguments) -> list[dict]:
    """The --dataset sources in order; 'builtin' is the built-in tasks' train split (--tasks)."""
    from pipeline import data, tasks

    out = []
    for source in stage_args.dataset:
        if source == data.BUILTIN:
            out += tasks.conversations("train", corpus_file=stage_args.corpus_file, tasks=stage_args.tasks)
        else:
            out += data.load_conversations([source], corpus_file=stage_args.corpus_file)
    return out


def load_preferences(stage_args: StageArguments) -> tuple[list[dict], int]:
    """(pairs, pairs dropped for chosen == rejected) from the --dataset sources."""
    from pipeline import data, tasks

    out, dropped = [], 0
    for source in stage_args.dataset:
        if source == data.BUILTIN:
            pairs = tasks.preference_pairs("train", corpus_file=stage_args.corpus_file, tasks=stage_args.tasks)
        else:
            pairs, n_identical = data.load_preferences([source], corpus_file=stage_args.corpus_file)
            dropped += n_identical
        out += [{**pair, "source": source} for pair in pairs]  # held-out accuracy is reported per source
    return out, dropped


def task_examples(stage_args: StageArguments) -> list[dict]:
    """Held-out built-in examples scored at the end of a stage."""
    from pipeline import tasks

    if not stage_args.eval_examples:
        return []
    return tasks.conversations("eval", n=stage_args.eval_examples, corpus_file=stage_args.corpus_file, tasks=stage_args.tasks)


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    """runs.prepare_output_dir on the main process only, the others waiting: with several processes
    an --overwrite on each would delete what the first had already written (e.g. train.log)."""
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            runs.prepare_output_dir(output_dir, overwrite=overwrite)


def on_device(model):
    """The model on this process's accelerator (before a trainer has placed it), for evaluation."""
    from accelerate import PartialState

    return model.to(PartialState().device)


def evaluate_policy(model, tokenizer, examples, max_new_tokens: int) -> dict:
    if not examples:
        return {}
    from pipeline import evaluate

    on_device(model)
    was_training = model.training
    model.eval()
    result = evaluate.evaluate_tasks(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    model.train(was_training)
    return result


def summarize_tasks(result: dict) -> str:
    """'overall 63% | copy 90% | ...' from evaluate_tasks' result."""
    if not result:
        return "not evaluated"

    def pct(value):
        value = value.get("accuracy", value) if isinstance(value, dict) else value
        return f"{100 * value:.0f}%" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)

    parts = [f"overall {pct(result.get('overall'))}"]
    parts += [f"{task} {pct(value)}" for task, value in sorted((result.get("per_task") or {}).items())]
    return " | ".join(parts)


def finish_stage(trainer, output_dir: Path, stage: str, metrics: dict, evaluation: dict, finished: bool = True, push_request=None) -> None:
    """Write log_history.json, eval.json, metrics.json and the model card, then the finished marker
    (last), then push if `--push_to_hub` asked for it."""
    if not trainer.is_world_process_zero():
        return
    from pipeline import cards, push

    runs.write_json(output_dir / "log_history.json", trainer.state.log_history)
    runs.write_json(output_dir / "eval.json", evaluation)
    runs.write_json(output_dir / "metrics.json", {**metrics, "eval": evaluation})
    cards.write_model_card(output_dir, stage)  # replaces the generic card TRL's save_model writes
    if finished:
        runs.mark_finished(output_dir, stage, global_step=trainer.state.global_step)
        push.maybe_push(push_request, output_dir, stage)


def train_metrics(result, seconds: float) -> dict:
    metrics = {k: v for k, v in (result.metrics if result is not None else {}).items() if k != "total_flos"}
    metrics["train_wall_seconds"] = round(seconds, 1)
    return metrics


# ---------------------------------------------------------------------------------------------------
# PPO monitoring


class TrainingCollapsed(Exception):
    """Raised by PPOMonitor with --stop_on_collapse: PPOTrainer's loop ignores `should_training_stop`."""


def repetition(token_ids: list[int]) -> float:
    """Share of repeated token trigrams: 0 for varied text, near 1 for a loop ("the the the ...")."""
    trigrams = list(zip(token_ids, token_ids[1:], token_ids[2:]))
    return 1 - len(set(trigrams)) / len(trigrams) if len(trigrams) > 1 else 0.0


class PPOMonitor:
    """Adds eos_rate (this update's rollouts), response_length and repetition (greedy replies to fixed
    probe prompts, every logging step) to PPO's log; warns when KL to the reference runs away or the
    replies collapse (no end-of-turn, loops), and raises TrainingCollapsed when asked to stop."""

    def __init__(self, tokenizer, probe_conversations, max_new_tokens: int, max_kl: float, min_eos_rate: float, max_repetition: float, stop: bool):
        self.tokenizer, self.probe_conversations, self.max_new_tokens = tokenizer, probe_conversations, max_new_tokens
        self.max_kl, self.min_eos_rate, self.max_repetition, self.stop = max_kl, min_eos_rate, max_repetition, stop
        self.trainer = None  # set after the trainer exists: the probe samples its current policy
        self.warnings: list[str] = []

    def callback(self):
        from transformers import TrainerCallback

        monitor = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                monitor.on_log(args, state, logs)

        return Callback()

    @staticmethod
    def is_report_step(state) -> bool:
        every = max(1, int(getattr(state, "logging_steps", 0) or 1))
        return state.global_step == 1 or state.global_step % every == 0 or state.global_step == state.max_steps

    def probe(self) -> dict:
        from pipeline import evaluate

        policy = self.trainer.accelerator.unwrap_model(self.trainer.model).policy
        replies = evaluate.generate_replies(policy, self.tokenizer, self.probe_conversations, self.max_new_tokens)
        n = max(1, len(replies))
        return {
            "response_length": sum(r["response_tokens"] for r in replies) / n,
            "probe_eos_rate": sum(r["stopped"] for r in replies) / n,
            "repetition": sum(repetition(chat_format.encode_text(self.tokenizer, r["reply"])) for r in replies) / n,
            "sample": replies[0]["reply"] if replies else "",
        }

    def on_log(self, args, state, logs) -> None:
        if not logs or "objective/kl" not in logs:
            return
        added = {"eos_rate": logs.get("val/num_eos_tokens", 0) / max(1, args.local_batch_size)}
        if self.is_report_step(state) and self.trainer is not None and self.probe_conversations:
            probe = self.probe()
            sample = probe.pop("sample")
            added.update(probe)
            logger.info(f"probe @ update {state.global_step} | {self.probe_conversations[0][-1]['content']!r} -> {sample!r}")
            self.check(state.global_step, logs["objective/kl"], probe)
        logs.update(added)
        state.log_history[-1].update(added)

    def check(self, step: int, kl: float, probe: dict) -> None:
        problems = []
        if kl > self.max_kl:
            problems.append(f"KL to the SFT reference {kl:.2f} > {self.max_kl} (raise --kl_coef or lower --learning_rate)")
        if probe["probe_eos_rate"] < self.min_eos_rate:
            problems.append(f"only {probe['probe_eos_rate']:.0%} of replies end with <|end|> (< {self.min_eos_rate:.0%}; raise --missing_eos_penalty)")
        if probe["repetition"] > self.max_repetition:
            problems.append(f"replies repeat themselves ({probe['repetition']:.0%} repeated token trigrams > {self.max_repetition:.0%})")
        for problem in problems:
            message = f"warning: PPO update {step}: {problem}"
            self.warnings.append(message)
            if training.is_main_process():
                logger.warning(message)
                print(message, file=sys.stderr, flush=True)
        if problems and self.stop:
            raise TrainingCollapsed(f"update {step}: {'; '.join(problems)}")


PPO_LOG_KEYS = {  # PPOTrainer's metric -> our short name in the dense log line
    "objective/scores": "reward",
    "objective/rlhf_reward": "rlhf_reward",
    "objective/kl": "kl",
    "objective/entropy": "entropy",
    "eos_rate": "eos_rate",
    "response_length": "response_length",
    "repetition": "repetition",
    "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss",
    "policy/clipfrac_avg": "clipfrac",
    "lr": "learning_rate",
}


def ppo_progress():
    """The dense progress line for PPO: a few named metrics every logging step (PPOTrainer logs
    ~20 metrics on every update; log_history.json keeps them all)."""
    class PPOProgress(training.DenseProgress):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/kl" in logs:
                if not PPOMonitor.is_report_step(state):
                    return
                logs = {short: logs[key] for key, short in PPO_LOG_KEYS.items() if key in logs}
            super().on_log(args, state, control, logs=logs, **kwargs)

    return PPOProgress()
