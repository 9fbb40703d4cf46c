"""The alignment stages' argument dataclasses: what configs/<preset>/<stage>.yaml and the flags fill for SFT, the
reward model, PPO, GRPO and DPO, on TRL's configs (the tokenizer's, pretraining's, the evaluation's and the fields the
alignment stages share are arguments.py's, which imports neither transformers nor TRL). ARGUMENTS maps each step of
the chain to its dataclasses: run_all checks --stage_args against them before the chain starts, tests parse every
recipe with them, and a test checks that each command parses with the same.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments
from trl import DPOConfig, GRPOConfig, RewardConfig, SFTConfig

from fluxchat import arguments, chat_format, data
from fluxchat.arguments import (
    DataArguments,
    EvaluateArguments,
    ModelArguments,
    PeftArguments,
    StageArguments,
    TokenizerArguments,
)

# Before TRL's experimental PPO is imported: it warns about its experimental modules at import time.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.ppo import PPOConfig  # noqa: E402


def check_mix_text(path: str | None, window: int) -> None:
    """--mix_text_file and --mix_text_window (SFT's and DPO's), refused before any folder is made."""
    if path and Path(path).is_dir():
        raise ValueError(f"--mix_text_file {path} is a folder: name a text file")
    if path and not Path(path).is_file():
        raise ValueError(f"--mix_text_file {path}: no such file")
    if path:
        try:
            data.check_utf8(Path(path), "--mix_text_file")
        except OSError as err:  # a file it may not read: a one-line error, not a traceback
            raise ValueError(f"--mix_text_file {path}: cannot read it ({err.strerror or err})") from None
    if window < 2:
        raise ValueError(f"--mix_text_window must be at least 2, got {window}")


# pipeline/sft.py
@dataclass
class SFTArguments(StageArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id to fine-tune; default runs/<run_name>/pretrain."}
    )
    chat_format: str | None = field(
        default=None,
        metadata={
            "help": f"Chat template the model learns: {' or '.join(chat_format.FORMATS)}; default the one its tokenizer was trained with. Later stages inherit it."
        },
    )
    eval_fraction: float = field(
        default=0.02, metadata={"help": "Share of the training conversations held out for the eval loss (0 = none)."}
    )
    inspect: bool = field(
        default=False,
        metadata={"help": "Print one tokenized example with the loss-bearing tokens in [[...]] and exit."},
    )
    resume: bool = arguments.resume_field()
    mix_text_file: str | None = field(
        default=None,
        metadata={
            "help": "Plain text mixed into SFT as language-modelling rows (loss on every token), e.g. the facts prose of pretraining, so SFT reaches what pretraining stored; default none."
        },
    )
    mix_text_fraction: float = field(
        default=0.3,
        metadata={
            "help": "Share of the loss-bearing tokens that come from --mix_text_file windows (the rest: the replies), in [0, 1)."
        },
    )
    mix_text_window: int = field(
        default=64,
        metadata={
            "help": "Tokens per --mix_text_file window (capped at the context); about a conversation's length, so batches stay short."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.chat_format is not None and self.chat_format not in chat_format.FORMATS:
            raise ValueError(f"--chat_format {self.chat_format}: choose from {', '.join(chat_format.FORMATS)}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}")
        check_mix_text(self.mix_text_file, self.mix_text_window)
        if not 0 <= self.mix_text_fraction < 1:
            raise ValueError(f"--mix_text_fraction must be in [0, 1), got {self.mix_text_fraction}")


# TRL 1.12's SFT losses; it names a wrong one only once the trainer is built, in a traceback.
SFT_LOSSES = ("nll", "chunked_nll", "dft")


@dataclass
class StageSFTConfig(SFTConfig):
    def __post_init__(self):
        if self.loss_type is not None and self.loss_type not in SFT_LOSSES:
            raise ValueError(f"--loss_type {self.loss_type}: choose from {', '.join(SFT_LOSSES)}")
        super().__post_init__()


# pipeline/reward.py
@dataclass
class RewardArguments(StageArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "SFT model folder or Hub id to start from; default runs/<run_name>/sft."}
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Share of the given pairs held out and scored at the end (and as eval during training)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval_fraction must be in (0, 1), got {self.eval_fraction}")


# pipeline/grpo.py
@dataclass
class GRPOArguments(StageArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "SFT model folder or Hub id to start from (and the KL reference); default runs/<run_name>/sft."
        },
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "A trained reward model (pipeline/reward.py) whose score is added to the rewards; default none."
        },
    )
    train_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Built-in tasks whose train prompts are sampled (e.g. arithmetic, where sampling finds right answers); default --tasks. Evaluation stays on --tasks."
        },
    )
    answer_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the answer reward (1 when the reply is the expected answer); 0 turns it off."},
    )
    format_weight: float = field(
        default=0.25,
        metadata={
            "help": "Weight of the format reward (1 when the reply ends with <|end|> and invents no next turn); 0 turns it off."
        },
    )
    reward_model_weight: float = field(
        default=1.0, metadata={"help": "Weight of the reward model's score (only with --reward_model_path)."}
    )
    answer_match: str = field(
        default="exact",
        metadata={
            "help": "How a prompt file's answers are checked: 'exact' (normalised: case, spaces, outer punctuation ignored) or 'contains'."
        },
    )
    resume: bool = arguments.resume_field()

    def __post_init__(self):
        super().__post_init__()
        if self.answer_match not in ("exact", "contains"):
            raise ValueError(f"--answer_match {self.answer_match}: choose exact or contains")
        if min(self.answer_weight, self.format_weight, self.reward_model_weight) < 0:
            raise ValueError("--answer_weight, --format_weight and --reward_model_weight must be >= 0")


@dataclass
class StageGRPOConfig(GRPOConfig):
    def __post_init__(self):
        # Here, not in main(): run_all parses every stage's flags before the chain starts.
        if self.reward_weights is not None:
            raise ValueError(
                "--reward_weights: set --answer_weight, --format_weight and --reward_model_weight instead (the stage "
                "picks the reward functions)"
            )
        if self.use_vllm:
            raise ValueError("--use_vllm: not supported by this stage (it generates with transformers); drop the flag")
        # TRL says the same, but without naming the flag.
        if self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"--num_generations {self.num_generations}: GRPO compares replies within a group, so it needs at least 2"
            )
        # TRL derives the generation batch from it: at 0 or below torch's data loader failed once training started
        if self.steps_per_generation is not None and self.steps_per_generation < 1:
            raise ValueError(f"--steps_per_generation must be >= 1, got {self.steps_per_generation}")
        if self.temperature <= 0:  # transformers would refuse it at the first step, in a traceback
            raise ValueError(
                f"--temperature must be > 0, got {self.temperature:g}: GRPO samples each group (at 0 its replies would all be one)"
            )
        try:
            super().__post_init__()
        except ValueError as err:  # TRL's line names its derived generation_batch_size, not a flag a user typed
            if "must be divisible by num_generations" not in str(err):
                raise
            raise ValueError(
                f"--per_device_train_batch_size {self.per_device_train_batch_size} (x processes x --steps_per_generation) "
                f"must hold whole groups of --num_generations {self.num_generations}: {err}"
            ) from None


# pipeline/dpo.py
@dataclass
class DPOArguments(StageArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "SFT model folder or Hub id: the policy and the frozen reference; default runs/<run_name>/sft."
        },
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Share of the given pairs held out and scored at the end (and as eval during training)."},
    )
    resume: bool = arguments.resume_field()
    mix_text_file: str | None = field(
        default=None,
        metadata={
            "help": "Plain text (e.g. pretraining's facts prose) whose language-modelling loss is added to DPO's on every batch of pairs, so the preference training does not overwrite what pretraining stored; default none."
        },
    )
    mix_text_weight: float = field(
        default=1.0, metadata={"help": "Weight of that loss (its mean per token) in the sum with DPO's."}
    )
    mix_text_rows: int = field(
        default=8, metadata={"help": "--mix_text_file windows per batch of pairs (per gradient-accumulation step)."}
    )
    mix_text_window: int = field(
        default=64, metadata={"help": "Tokens per --mix_text_file window (capped at the context)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval_fraction must be in (0, 1), got {self.eval_fraction}")
        check_mix_text(self.mix_text_file, self.mix_text_window)
        if not (math.isfinite(self.mix_text_weight) and self.mix_text_weight >= 0):
            raise ValueError(f"--mix_text_weight must be a finite number >= 0, got {self.mix_text_weight:g}")
        if self.mix_text_rows < 1:
            raise ValueError(f"--mix_text_rows must be at least 1, got {self.mix_text_rows}")


# TRL 1.12's DPO losses; it names a wrong one only at the first training step, in a traceback.
DPO_LOSSES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


@dataclass
class StageDPOConfig(DPOConfig):
    def __post_init__(self):
        losses = self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]
        unknown = [loss for loss in losses if loss not in DPO_LOSSES]
        if unknown:
            raise ValueError(f"--loss_type {' '.join(unknown)}: choose from {', '.join(DPO_LOSSES)}")
        if self.beta <= 0:  # TRL trains at 0 or below: every pair then ties, or the preference is reversed
            raise ValueError(f"--beta must be > 0 (it scales the implicit reward), got {self.beta:g}")
        weights = self.loss_weights or []
        # A list escapes the NaN check every number gets, and TRL multiplies the losses by these unchecked.
        if not all(math.isfinite(w) and w >= 0 for w in weights) or (weights and not any(weights)):
            shown = " ".join(f"{w:g}" for w in weights)
            raise ValueError(f"--loss_weights {shown}: each must be a finite number >= 0, and not all 0")
        # The chance a preference label is flipped (robust, aot, exo_pair): at 0.5 robust divides by 0, above it
        # the preference is reversed; TRL only warns.
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing:g}")
        if "exo_pair" in losses and self.label_smoothing == 0:  # TRL refuses it only once the trainer is built
            raise ValueError("--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper uses 0.001)")
        super().__post_init__()


# pipeline/ppo.py
@dataclass
class PPOArguments(StageArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Policy and reference model (the SFT model); default runs/<run_name>/sft. Alias: --sft_model_path."
        },
    )
    value_model_path: str | None = field(
        default=None,
        metadata={"help": "Value model initialisation; default the reward model (as TRL's example does)."},
    )
    max_kl: float = field(
        default=10.0,
        metadata={
            "help": "Warn when the KL to the SFT reference (summed over a reply) exceeds this (negative: every update)."
        },
    )
    min_eos_rate: float = field(
        default=0.1, metadata={"help": "Warn when fewer probe replies than this end with <|end|>."}
    )
    max_repetition: float = field(
        default=0.5, metadata={"help": "Warn when probe replies repeat more token trigrams than this share."}
    )
    stop_on_collapse: bool = field(
        default=False, metadata={"help": "Stop (and mark nothing finished) when a warning above fires."}
    )
    probe_prompts: int = field(
        default=16,
        metadata={
            "help": "Held-out prompts answered greedily every logging step to measure reply length and repetition."
        },
    )


@dataclass
class StagePPOConfig(PPOConfig):
    # TRL defaults both to a Hub model; ours default to this run's stages.
    sft_model_path: str | None = field(
        default=None, metadata={"help": "TRL's name for --model_name_or_path (an alias)."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model; default runs/<run_name>/reward."}
    )

    def __post_init__(self):
        if self.max_steps > 0:  # TRL's PPOTrainer counts episodes; it trained the recipe's length, the card saying 2
            raise ValueError(
                f"--max_steps {self.max_steps}: PPO's length is --total_episodes (prompts sampled), not steps: set that instead"
            )
        if self.temperature <= 0:  # TRL divides by it (+1e-7): at 0 the policy's log-probs are meaningless
            raise ValueError(f"--temperature must be > 0, got {self.temperature:g}: PPO learns from sampled replies")
        # TRL checks these only once its trainer is built (after the models are loaded), as tracebacks.
        rollout = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.num_mini_batches >= 1 and rollout >= 1 and rollout % self.num_mini_batches:  # < 1: check_numbers
            raise ValueError(
                f"--num_mini_batches {self.num_mini_batches} must divide the rollout batch of {rollout} prompts per "
                f"process (--per_device_train_batch_size {self.per_device_train_batch_size} x "
                f"--gradient_accumulation_steps {self.gradient_accumulation_steps})"
            )
        elif self.whiten_rewards and self.num_mini_batches >= 1 and rollout // self.num_mini_batches < 8:
            raise ValueError(  # TRL asserts it once the models are loaded: whitening needs enough rewards to normalise
                f"--whiten_rewards needs mini-batches of at least 8 prompts per process, got {rollout // self.num_mini_batches} "
                f"(--per_device_train_batch_size {self.per_device_train_batch_size} x --gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps} / --num_mini_batches {self.num_mini_batches})"
            )
        if self.stop_token and self.stop_token_id is not None:
            raise ValueError(
                f"--stop_token_id {self.stop_token_id} and --stop_token {self.stop_token} both choose where replies stop "
                "(every --preset's ppo.yaml sets stop_token: eos, and no flag unsets it): drop --stop_token_id, "
                "or use --config with a copy of the recipe without stop_token"
            )
        super().__post_init__()


# Each step's dataclasses, in chain order (run_all's report step is evaluate.py --report: it parses with evaluate's).
ARGUMENTS = {
    "tokenizer": (TokenizerArguments,),
    "pretrain": (ModelArguments, DataArguments, TrainingArguments),
    "sft": (SFTArguments, PeftArguments, StageSFTConfig),
    "reward": (RewardArguments, PeftArguments, RewardConfig),
    "ppo": (PPOArguments, PeftArguments, StagePPOConfig),
    "grpo": (GRPOArguments, PeftArguments, StageGRPOConfig),
    "dpo": (DPOArguments, PeftArguments, StageDPOConfig),
    "evaluate": (EvaluateArguments,),
}
