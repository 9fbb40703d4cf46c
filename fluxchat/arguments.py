"""Argument dataclasses every alignment stage shares (data sources, evaluation, overwrite, LoRA)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields

from fluxchat.cli import fail, main_process
from fluxchat.tasks import corpus_file_problem, parse_task_weights


def resume_field():
    """`--resume`, as every stage that can continue a checkpoint says it."""
    return field(
        default=False, metadata={"help": "Continue from the newest complete checkpoint in the output folder."}
    )


def overwrite_field():
    return field(default=False, metadata={"help": "Replace a finished run in the output folder."})


@dataclass
class StageArguments:
    """Fields every alignment stage has."""

    dataset: list[str] = field(
        default_factory=lambda: ["builtin"],
        metadata={
            "help": "Data sources to mix: 'builtin' (generated tasks), local .jsonl/.json/.parquet files, or Hub dataset ids."
        },
    )
    corpus_file: str | None = field(
        default=None,
        metadata={
            "help": "Text corpus the built-in quote/speaker tasks draw lines from; default the shipped tinyshakespeare (data/)."
        },
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Built-in tasks to train and evaluate on; default all (quote speaker arithmetic copy upper capital followup)."
        },
    )
    builtin_examples: int = field(
        default=6000,
        metadata={
            "help": "Training examples the 'builtin' source generates (balanced across tasks); more distinct items generalise better than repeats of few."
        },
    )
    task_weights: list[str] | None = field(
        default=None,
        metadata={
            "help": "Shares of the 'builtin' source's examples as task=weight (e.g. capital=0.5); unnamed tasks weigh 1."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows (a seeded sample); default all."}
    )
    eval_examples: int = field(
        default=140,
        metadata={"help": "Held-out built-in examples scored at the end of the stage (balanced across tasks)."},
    )
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Reply length limit when scoring held-out tasks."})
    eval_baseline: bool = field(
        default=True,
        metadata={"help": "Also score the input model before training, so metrics.json shows what the stage changed."},
    )
    overwrite: bool = overwrite_field()

    @property
    def builtin_weights(self) -> dict[str, float]:
        """--task_weights as {task: weight}, for the 'builtin' source's generators."""
        return parse_task_weights(self.task_weights)

    def __post_init__(self):
        if not self.dataset:
            raise ValueError("--dataset needs at least one source (e.g. builtin)")
        if self.builtin_examples < 1:
            raise ValueError(f"--builtin_examples must be at least 1, got {self.builtin_examples}")
        parse_task_weights(self.task_weights)  # a malformed entry fails here, before any folder is made
        if problem := corpus_file_problem(self.corpus_file):
            raise ValueError(problem)
        if self.eval_examples < 0 or self.eval_max_new_tokens < 1:
            raise ValueError("--eval_examples must be >= 0 and --eval_max_new_tokens >= 1")


@dataclass
class PeftArguments:
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt; default all linear layers (GPT-2: c_attn c_proj c_fc)."},
    )
    merge_adapter: bool = field(
        default=True,
        metadata={
            "help": "Save the adapter merged into a plain model, so the next stage and chat load it without peft."
        },
    )

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha < 1 or not 0 <= self.lora_dropout < 1:
            raise ValueError("--lora_r and --lora_alpha must be >= 1 and --lora_dropout in [0, 1)")


# What peft's LoRA can wrap (by class name: GPT-2's projections are transformers' Conv1D).
LORA_ADAPTABLE = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d")


def lora_config(peft_args: PeftArguments, task_type: str, model):
    """A peft LoraConfig for `model`, or None without --use_peft. task_type SEQ_CLS keeps the new score head
    trainable. Call it before the stage writes anything: it checks --lora_target_modules against the model."""
    if not peft_args.use_peft:
        # A LoRA setting given without the switch would otherwise go unseen while every weight trains.
        if given := [f"--{f.name}" for f in fields(peft_args) if getattr(peft_args, f.name) != f.default]:
            if main_process():
                print(f"note: {', '.join(given)} without --use_peft: all weights train, no LoRA", file=sys.stderr)
        return None
    from peft import LoraConfig  # peft only with --use_peft: an optional dependency

    if peft_args.lora_target_modules:
        check_lora_targets(model, peft_args.lora_target_modules)
    return LoraConfig(
        r=peft_args.lora_r,
        lora_alpha=peft_args.lora_alpha,
        lora_dropout=peft_args.lora_dropout,
        target_modules=peft_args.lora_target_modules or "all-linear",
        task_type=task_type,
        # GPT-2 keeps its projections transposed (transformers' Conv1D): said here, peft does not correct it with
        # a warning for every stage.
        fan_in_fan_out=any(type(module).__name__ == "Conv1D" for module in model.modules()),
    )


def check_lora_targets(model, targets: list[str]) -> None:
    """Each target must name (as peft matches it: the whole name or its last parts) a module LoRA can adapt;
    peft says so only when the trainer is built, in a traceback, and not at all for one of several."""
    kinds: dict[str, set[str]] = {target: set() for target in targets}
    adaptable = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in LORA_ADAPTABLE:
            adaptable.add(name.rsplit(".", 1)[-1])
        for target in targets:
            if name == target or name.endswith("." + target):
                kinds[target].add(kind)
    for target, found in kinds.items():
        if not found & set(LORA_ADAPTABLE):
            what = f"a {'/'.join(sorted(found))}, which LoRA cannot adapt" if found else "no module of the model"
            fail(f"--lora_target_modules {target}: {what}; choose from {' '.join(sorted(adaptable))}")
