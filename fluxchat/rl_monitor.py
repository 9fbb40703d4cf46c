"""Watching an RL stage: PPO's probe replies, collapse warnings and dense log line; GRPO's training trend."""

from __future__ import annotations

import sys

from transformers import TrainerCallback

from fluxchat import chat_format, generation, training
from fluxchat.cli import main_process
from fluxchat.training import logger


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

    def __init__(
        self,
        tokenizer,
        probe_conversations,
        max_new_tokens: int,
        max_kl: float,
        min_eos_rate: float,
        max_repetition: float,
        stop: bool,
    ):
        self.tokenizer, self.probe_conversations, self.max_new_tokens = tokenizer, probe_conversations, max_new_tokens
        self.max_kl, self.min_eos_rate, self.max_repetition, self.stop = max_kl, min_eos_rate, max_repetition, stop
        self.trainer = None  # set after the trainer exists: the probe samples its current policy
        self.warnings: list[str] = []

    def callback(self):
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
        policy = self.trainer.accelerator.unwrap_model(self.trainer.model).policy
        replies = generation.generate_replies(policy, self.tokenizer, self.probe_conversations, self.max_new_tokens)
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
            logger.info(
                f"probe @ update {state.global_step} | {self.probe_conversations[0][-1]['content']!r} -> {sample!r}"
            )
            self.check(state.global_step, logs["objective/kl"], probe)
        logs.update(added)
        state.log_history[-1].update(added)

    def check(self, step: int, kl: float, probe: dict) -> None:
        problems = []
        if kl > self.max_kl:
            problems.append(
                f"KL to the SFT reference {kl:.2f} > {self.max_kl} (raise --kl_coef or lower --learning_rate)"
            )
        if probe["probe_eos_rate"] < self.min_eos_rate:
            problems.append(
                f"only {probe['probe_eos_rate']:.0%} of replies end with <|end|> (< {self.min_eos_rate:.0%}; raise --missing_eos_penalty)"
            )
        if probe["repetition"] > self.max_repetition:
            problems.append(
                f"replies repeat themselves ({probe['repetition']:.0%} repeated token trigrams > {self.max_repetition:.0%})"
            )
        for problem in problems:
            message = f"warning: PPO update {step}: {problem}"
            self.warnings.append(message)
            if main_process():
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


def grpo_trend(log_history: list[dict], steps_per_log: int) -> dict:
    """GRPO's training reward, KL and reply length at its first and last logging window. Each logged figure is TRL's
    mean over a window (--logging_steps steps), not one step's; a run of a single window has one, which "first" and
    "last" alike made read as "no change"."""
    logged = [entry for entry in log_history if "reward" in entry]
    if not logged:
        return {}
    ends = {"first": logged[0], "last": logged[-1]} if len(logged) > 1 else {"last": logged[0]}
    trend: dict = {
        key: {end: entry.get(key) for end, entry in ends.items()}
        for key in ("reward", "kl", "completions/mean_length")
    }
    trend["logged_at_steps"] = [entry["step"] for entry in ends.values()]
    trend["steps_per_log"] = steps_per_log
    return trend
