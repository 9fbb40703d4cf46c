"""Argument dataclasses that need neither transformers nor TRL: the fields every alignment stage shares (data
sources, evaluation, overwrite, LoRA), the tokenizer's, pretraining's model and data arguments, and the evaluation's.
The alignment stages' own, on TRL's configs, are stage_arguments.py's."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from fluxchat import chat_format, runs, tasks
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


# GPT-2's attention implementations in transformers 5 -> (module, pip package) each needs beyond torch.
ATTENTION_PACKAGES = {
    "sdpa": None,
    "eager": None,
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
}


def check_model_folder(source: str) -> None:
    """pretrain's --model_name_or_path, before anything is read: transformers' own errors for a tokenizer folder, a
    run folder or a typo were tracebacks ("Unrecognized model ... Should have a `model_type` key")."""
    path = Path(source)
    flag = f"--model_name_or_path {source}"
    if path.is_dir() and any(runs.is_finished(path / stage) for stage in runs.STAGES):
        raise ValueError(f"{flag} is a run folder: give one of its stages' folders, such as {path / 'pretrain'}")
    if path.is_dir() and not runs.holds_model(path):
        raise ValueError(f"{flag}: no model in it (no config.json): give a model folder, such as runs/<name>/pretrain")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} is a file: give a model folder or a Hub id")
    if not path.exists() and not runs.looks_like_hub_id(source):
        raise ValueError(f"{flag}: no such folder (give a model folder or a Hub id)")


def check_model_fits(n_layer: int, n_embd: int, block_size: int) -> None:
    """A fresh model whose weights alone (float32, not counting the embedding of a vocabulary not known yet) exceed
    this machine's memory: torch's "can't allocate memory: you tried to allocate 1099511627776 bytes" was a
    traceback. Training needs about four times the weights (gradients, two Adam moments) on its device on top."""
    body, positions = 12 * n_layer * n_embd**2, block_size * n_embd
    weights = 4 * (body + positions)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the allocation says so itself
        return
    if weights > memory:
        # The flag that makes most of the size first: an error line is said to come from the recipe's file where the
        # first flag it names came from there.
        sizes = {"block_size": block_size, "n_embd": n_embd, "n_layer": n_layer}
        order = ["block_size", "n_embd", "n_layer"] if positions > body else ["n_embd", "n_layer", "block_size"]
        raise ValueError(
            " ".join(f"--{name} {sizes[name]}" for name in order)
            + f": the weights alone would take {weights / 2**30:,.0f} GiB, more than this machine's "
            f"{memory / 2**30:,.0f} GiB of memory: choose a smaller model"
        )


@dataclass
class ModelArguments:
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id; default the --model_name_or_path folder's own, else runs/<run_name>/tokenizer."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from this causal LM instead of a fresh GPT-2."}
    )
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks."})
    n_embd: int = field(default=128, metadata={"help": "Hidden width."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (must divide n_embd)."})
    block_size: int = field(default=128, metadata={"help": "Context length in tokens (GPT-2's n_positions)."})
    dropout: float = field(
        default=0.0, metadata={"help": "For pretraining 0 is good; for small data and many epochs try 0.1+."}
    )
    pad_vocab_to_multiple_of: int = field(
        default=0, metadata={"help": "Round the embedding up (64 helps GPUs); 0 = exact."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "sdpa (fused attention), eager, or flash_attention_2/3 (CUDA, with the flash-attn package)."
        },
    )

    def __post_init__(self):
        # Below 1, check_numbers' range line says so (here it would be a ZeroDivisionError).
        if self.n_head >= 1 and self.n_embd % self.n_head:
            raise ValueError(f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}")
        if self.model_name_or_path:
            check_model_folder(self.model_name_or_path)
        else:
            check_model_fits(self.n_layer, self.n_embd, self.block_size)
        if self.attn_implementation not in ATTENTION_PACKAGES:
            raise ValueError(
                f"--attn_implementation {self.attn_implementation!r}: choose from {', '.join(ATTENTION_PACKAGES)}"
            )
        package = ATTENTION_PACKAGES[self.attn_implementation]
        # transformers can also take flash attention from the `kernels` package; without either it fails mid-load.
        if package and not any(importlib.util.find_spec(name) for name in (package[0], "kernels")):
            raise ValueError(
                f"--attn_implementation {self.attn_implementation} needs the {package[1]} package "
                f"(pip install {package[1]}, CUDA only); or use sdpa"
            )


@dataclass
class DataArguments:
    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "Text files/folders (.txt/.jsonl/.parquet); default the shipped tinyshakespeare (data/)."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (or local dataset folder) instead of files."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The Hub dataset's configuration (e.g. wikitext-103-raw-v1)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "The Hub dataset's split to read."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the Hub dataset into token shards without downloading it whole first."},
    )
    text_column: str = field(default="text", metadata={"help": "Column with text for jsonl/parquet/Hub data."})
    validation_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Held-out tail of each text file (nanoGPT: the last tenth); streamed: every 1/fraction-th document."
        },
    )
    token_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where token shards are cached; default $FLUXCHAT_CACHE/tokens (~/.cache/fluxchat/tokens)."},
    )
    tokenize_threads: int = field(
        default=0, metadata={"help": "Threads tokenizing a new corpus (the tokenizer's own); 0 = one per CPU core."}
    )
    sample_prompts: list[str] | None = field(default=None, metadata={"help": "Prompts sampled after each evaluation."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of those samples (0: no samples)."})
    resume: bool = resume_field()
    overwrite: bool = overwrite_field()


@dataclass
class TokenizerArguments:
    run_name: str = field(default="default", metadata={"help": "Run folder: runs/<run_name>/tokenizer."})
    output_dir: str | None = field(default=None, metadata={"help": "Write here instead of the run folder."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Text files or folders (.txt/.jsonl/.parquet); default: tinyshakespeare."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id to train on instead of files."})
    text_column: str = field(default="text", metadata={"help": "Column holding text in jsonl/parquet/Hub data."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Held-out tail of each file, used for the compression report."}
    )
    tokenizer_type: str = field(
        default="bpe",
        metadata={
            "help": "bpe (byte-level, lossless), char (byte fallback, lossless) or word (words outside its vocabulary become <|unk|>).",
            "choices": ["bpe", "char", "word"],
        },
    )
    vocab_size: int = field(default=1024, metadata={"help": "Total vocabulary size, special tokens included."})
    split_digits: bool = field(
        default=True, metadata={"help": "One token per digit (as LLaMA): arithmetic gets much easier to learn."}
    )
    chat_format: str = field(
        default=chat_format.DEFAULT_FORMAT,
        metadata={"help": "Chat template to bake in: " + ", ".join(chat_format.FORMATS) + "."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished tokenizer in the output folder."})

    def __post_init__(self):
        if self.output_dir is not None and not self.output_dir.strip():  # else it reads as unset: runs/<run_name>
            raise ValueError(
                "--output_dir is empty: give a folder, or leave it out to write to runs/<run_name>/tokenizer"
            )
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.chat_format not in chat_format.FORMATS:
            raise ValueError(
                f"--chat_format must be one of {', '.join(chat_format.FORMATS)}, got '{self.chat_format}'"
            )


# pipeline/evaluate.py's.
SPLITS = ("eval", "train")
N_PER_TASK = 50
# The report compares stages that mostly keep their answers: at 50 items even GRPO's +6 points of sums (3 items)
# had an interval from -2 to +15; at 200, +6 (16 gained, 3 lost) is +2 to +11 (bench/results/issue14-2026-12-06).
REPORT_N_PER_TASK = 200


@dataclass
class EvaluateArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Model folder, run folder (its most aligned finished stage: ppo > grpo > dpo > sft > pretrain) or Hub id; may be given as the first argument."
        },
    )
    reward_model: str | None = field(
        default=None,
        metadata={
            "help": "Reward model folder: scores its accuracy on held-out pairs and the mean reward of the model's replies."
        },
    )
    pairs_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "Preference files (TRL or hh-rlhf, .jsonl.gz ok) to score the reward model on, besides the built-in held-out pairs."
        },
    )
    pairs_heldout_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Score only this fraction of each --pairs_file, split by --seed; default all pairs. A file the --reward_model's stage trained on is always scored on the pairs that stage held out, split again as it split them."
        },
    )
    max_pairs: int = field(
        default=1000,
        metadata={"help": "Score at most this many pairs per --pairs_file (the first ones after splitting)."},
    )
    n_per_task: int | None = field(
        default=None,
        metadata={
            "help": f"Held-out examples per built-in task; default {N_PER_TASK}, and {REPORT_N_PER_TASK} with --report (capital/followup have 51 distinct items)."
        },
    )
    tasks: list[str] | None = field(
        default=None, metadata={"help": f"Built-in tasks to evaluate; default all: {' '.join(tasks.TASKS)}."}
    )
    corpus_file: str | None = field(
        default=None,
        metadata={
            "help": "Corpus for the quote/speaker tasks; default the shipped tinyshakespeare (data/). Without it, those tasks are skipped."
        },
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Longest reply generated per prompt."})
    batch_size: int = field(default=32, metadata={"help": "Prompts generated (or pairs scored) together."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the held-out examples and of --pairs_heldout_fraction's split."}
    )
    output_file: str | None = field(
        default=None, metadata={"help": "Where to write the JSON; default evaluation.json in the model folder."}
    )
    split: str = field(
        default="eval",
        metadata={
            "help": "'eval': the held-out items, which every reported figure uses; 'train': fresh draws (by --seed) from the training items' pool, to choose between recipes without looking at the test items (items may repeat, and some were trained on). Default output then evaluation-train.json."
        },
    )
    report: bool = field(
        default=False,
        metadata={
            "help": "Stage report: every finished stage of the run folder (pretrain, sft, ppo, grpo, dpo) on the same held-out items -> <run>/report.json and report.md; the final stage's model card shows it."
        },
    )

    def __post_init__(self):
        if not self.model:
            raise ValueError("give the model to evaluate: python pipeline/evaluate.py <model or run folder>")
        if self.n_per_task is None:
            self.n_per_task = REPORT_N_PER_TASK if self.report else N_PER_TASK
        for flag in ("n_per_task", "max_new_tokens", "batch_size", "max_pairs"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        if self.split not in SPLITS:
            raise ValueError(f"--split {self.split}: choose {' or '.join(SPLITS)}")
        if problem := tasks.corpus_file_problem(self.corpus_file):
            raise ValueError(problem)
        if self.pairs_heldout_fraction is not None and not 0 < self.pairs_heldout_fraction < 1:
            raise ValueError(f"--pairs_heldout_fraction must be between 0 and 1, got {self.pairs_heldout_fraction}")
