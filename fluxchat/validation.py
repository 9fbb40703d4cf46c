"""Numeric flags, checked once for every command: no NaN or infinity anywhere, and each known field in its range.

`config.parse_config` calls `check_numbers` on every parsed dataclass (ours and the transformers/TRL
training arguments), so a bad number is one line before anything is loaded or written, whatever the stage:
`--learning_rate -0.001`, `--block_size 0`, `--validation_fraction nan`, `--response_length -4`.

Rules go by field name, so one rule covers every stage that has the field. A field with no rule is still
refused when it is NaN or infinite: argparse's `float` accepts "nan" and "inf", no recipe means them.
`check_report_to` does the same for `--report_to`: an integration transformers does not know, or one whose package
is not installed, failed in the Trainer's constructor, in a traceback, after the stage folder was made.

Raises ValueError (parse_config turns it into the one-line UsageError); imports nothing of ours.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple


class Rule(NamedTuple):
    ok: Callable[[float], bool]
    text: str  # what a valid value is, as the error line says it


# Values quoted in an error line are cut to this many characters: a 10 MB value would otherwise be a 10 MB line.
SHOWN_CHARS = 60


def short(value: object) -> str:
    """`value` as an error line quotes it: its first SHOWN_CHARS characters, then '...' where there was more."""
    text = str(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def show_number(value: float) -> str:
    # An int as it was typed (`{:g}` would print 4294967296 as 4.29497e+09), cut like any value: a 4000-digit one is
    # still an int, and too large for a float.
    return short(value) if isinstance(value, int) else f"{value:g}"


def positive() -> Rule:
    return Rule(lambda v: v > 0, "> 0")


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f">= {low:g}")


def fraction(closed: bool = False) -> Rule:
    return Rule((lambda v: 0 <= v <= 1) if closed else (lambda v: 0 <= v < 1), "in [0, 1]" if closed else "in [0, 1)")


RULES: dict[str, Rule] = {
    # optimisation (TrainingArguments and every TRL config)
    "learning_rate": positive(),
    "num_train_epochs": positive(),
    "per_device_train_batch_size": at_least(1),
    "per_device_eval_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "warmup_ratio": fraction(closed=True),
    "warmup_steps": at_least(0),
    "weight_decay": at_least(0),
    "max_grad_norm": at_least(0),
    "adam_beta1": fraction(),
    "adam_beta2": fraction(),
    "adam_epsilon": positive(),
    "logging_steps": positive(),  # <1: a share of the training steps
    "eval_steps": positive(),
    "save_steps": positive(),
    "max_length": at_least(1),
    # the model (pretrain)
    "block_size": at_least(2),  # a 1-token block predicts nothing (its one token has no token before it)
    "n_layer": at_least(1),
    "n_embd": at_least(1),
    "n_head": at_least(1),
    "dropout": fraction(),
    "pad_vocab_to_multiple_of": at_least(0),
    # data and evaluation
    "validation_fraction": fraction(),
    "eval_fraction": fraction(),
    "pairs_heldout_fraction": fraction(),
    "sample_max_new_tokens": at_least(0),
    "tokenize_threads": at_least(0),
    "max_train_samples": at_least(1),
    "eval_examples": at_least(0),
    "eval_max_new_tokens": at_least(1),
    "n_per_task": at_least(1),
    "max_pairs": at_least(1),
    "batch_size": at_least(1),
    "num_samples": at_least(1),
    # generation (generate, chat, app defaults; the app clamps what a client sends instead)
    "max_new_tokens": at_least(1),
    "temperature": at_least(0),
    "top_k": at_least(0),
    "top_p": Rule(lambda v: 0 < v <= 1, "in (0, 1]"),
    # GRPO and DPO
    "max_completion_length": at_least(1),
    "steps_per_generation": at_least(
        1
    ),  # GRPO (checked by its stage first: TRL derives generation_batch_size from it)
    "generation_batch_size": at_least(1),
    "num_iterations": at_least(1),
    "beta": at_least(0),  # GRPO's KL weight (0: none); DPO's, which must be above 0, is checked by its stage
    "precompute_ref_batch_size": at_least(1),  # DPO; TRL reads 0 as unset and uses the training batch size
    # PPO and its monitor
    "response_length": at_least(1),
    "num_ppo_epochs": at_least(1),
    "total_episodes": at_least(1),  # 0: TRL makes no update and saves the SFT model as PPO's
    "num_mini_batches": at_least(1),
    "local_rollout_forward_batch_size": at_least(1),  # at 0 the rollout's range() fails once training started
    "kl_coef": at_least(0),
    "cliprange": positive(),
    "cliprange_value": positive(),
    "vf_coef": at_least(0),
    "gamma": fraction(closed=True),
    "lam": fraction(closed=True),
    # max_kl: any finite number (NaN/inf are refused for every field); a negative one flags every update, which
    # is how the tests exercise --stop_on_collapse.
    "min_eos_rate": fraction(closed=True),
    "max_repetition": fraction(closed=True),
    "probe_prompts": at_least(0),
    # seeds: numpy's and torch's generators take 0 .. 2**32 - 1 and fail outside it, after the run folder is written
    # (transformers' set_seed), or with an overflow (torch.manual_seed), or not at all (TRL's PPO takes -1)
    "seed": Rule(lambda v: 0 <= v <= 2**32 - 1, f"in [0, {2**32 - 1}]"),
    "data_seed": Rule(lambda v: 0 <= v <= 2**32 - 1, f"in [0, {2**32 - 1}]"),
}


def check_numbers(instances: Iterable) -> None:
    """Raise ValueError naming the first flag whose number is NaN, infinite or out of its range."""
    for instance in instances:
        if not dataclasses.is_dataclass(instance):
            continue
        for spec in dataclasses.fields(instance):
            value = getattr(instance, spec.name, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # None (unset), text, lists: not numbers to check
            # An int is always finite, and math.isfinite overflows on one too large for a float
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{spec.name} must be a finite number, got {value}")
            rule = RULES.get(spec.name)
            if rule is not None and not rule.ok(value):
                raise ValueError(f"--{spec.name} must be {rule.text}, got {show_number(value)}")


def check_report_to(instances: Iterable) -> None:
    """Raise ValueError for a `--report_to` name the Trainer would fail on: unknown, or its package not installed."""
    # transformers is imported by then (parse_config parsed with it); imported here, not at the top, for the
    # commands that import this module and never train
    from transformers.integrations import integration_utils

    known = integration_utils.INTEGRATION_TO_CALLBACK
    installed = set(integration_utils.get_available_reporting_integrations())
    # The names get_available_reporting_integrations can find installed (flyte, for one, it cannot)
    checkable = {"azure_ml", "comet_ml", "dagshub", "dvclive", "mlflow", "neptune", "tensorboard", "wandb"}
    checkable |= {"codecarbon", "clearml", "swanlab", "trackio", "kubeflow"}
    for instance in instances:
        names = getattr(instance, "report_to", None)
        for name in [names] if isinstance(names, str) else names or []:
            if name not in known:
                choices = ", ".join(["none", "all", *known])
                raise ValueError(f"--report_to {short(name)}: unknown; choose from {choices}")
            if name in checkable and name not in installed:
                raise ValueError(
                    f"--report_to {name}: its package is not installed here: install it, or use --report_to none"
                )
