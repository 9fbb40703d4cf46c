"""Bad input at every entry point: one `error:` line naming the culprit, exit code 2, no traceback,
nothing written.

One table: each case names the entry point, the arguments (built from shared bad files and the
`tiny_run` stages), and the text the error line must contain. A case either runs the real CLI in a
subprocess (at least one per entry point, proving the one-line, traceback-free exit end to end) or,
where the failure is in the same code path, the real `main(argv)` in-process (much faster on 2 cores).
Subprocess cases start together, a few at a time, before the first of them is checked.

"Nothing written" is checked by fingerprinting every byte of the case's folder (its runs dir, its
outputs, copies of finished stages) and of `tiny_run` before and after: a failing command must leave
both identical. The one success case (paths with spaces) must finish its stage instead.

Cases that expose a defect not fixed yet are listed in DEFECTS with what goes wrong today and run as
strict xfails: once the defect is fixed the case passes, pytest reports XPASS as a failure, and the
entry comes out of DEFECTS.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PYTHON, SHAKESPEARE, run_main, run_script

from fluxchat import runs

ENTRY_POINTS = {  # entry point -> (script a user runs, module whose main() it calls)
    "tokenizer": ("tokenizer/train.py", "tokenizer.train"),
    "pretrain": ("pipeline/pretrain.py", "pipeline.pretrain"),
    "sft": ("pipeline/sft.py", "pipeline.sft"),
    "reward": ("pipeline/reward.py", "pipeline.reward"),
    "ppo": ("pipeline/ppo.py", "pipeline.ppo"),
    "dpo": ("pipeline/dpo.py", "pipeline.dpo"),
    "evaluate": ("pipeline/evaluate.py", "pipeline.evaluate"),
    "generate": ("pipeline/generate.py", "pipeline.generate"),
    "chat": ("pipeline/chat.py", "pipeline.chat"),
    "app": ("app.py", "app"),
    "run_all": ("pipeline/run_all.py", "pipeline.run_all"),
    "push": ("pipeline/push.py", "pipeline.push"),
}
PARALLEL_SUBPROCESSES = 3  # import time dominates each one; 3 at once keeps 2 cores busy without thrashing


@dataclass(frozen=True)
class Case:
    name: str
    entry: str
    argv: Callable[[SimpleNamespace, Path], list]  # (inputs, this case's folder) -> arguments
    expect: tuple[str, ...]  # substrings of the error line (for a success case: nothing)
    cli: bool = False  # run the real command in a subprocess
    prepare: Callable[[SimpleNamespace, Path], None] | None = None  # e.g. copy a finished stage into the case folder
    succeeds: Callable[[Path], Path] | None = None  # success case: the folder that must end up finished
    stdin: str | None = None
    env: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # success case: substrings its output (stdout or stderr) must show
    alone: bool = True  # subprocess failure: the error is the only line on stderr besides notes


def tiny_pretrain(inputs, case_dir) -> list:
    return [
        "--preset",
        "tiny",
        "--tokenizer_name_or_path",
        inputs.shared / "tokenizer",
        "--train_file",
        inputs.corpus,
        "--output_dir",
        case_dir / "out",
    ]


def sft_of_shared(inputs) -> list:
    # A few built-in conversations: the recipe's 35000 take seconds to build and change nothing these cases check.
    return ["--preset", "tiny", "--model_name_or_path", inputs.shared / "pretrain", "--builtin_examples", 64]


def ppo_rewarded_by(reward_model: Callable[[SimpleNamespace], Path]):
    """PPO of the shared pretrained model against `reward_model(inputs)`."""

    def argv(inputs, case_dir) -> list:
        policy = ["--preset", "tiny", "--sft_model_path", inputs.shared / "pretrain"]
        return [*policy, "--reward_model_path", reward_model(inputs), "--output_dir", case_dir / "out"]

    return argv


def copy_stage(stage: str, to: str):
    def prepare(inputs, case_dir):
        shutil.copytree(inputs.shared / stage, case_dir / to)

    return prepare


def unfinished_pretrain(inputs, case_dir, with_tokenizer=True):
    """What a kill -9 leaves: checkpoints and logs, no final model, no finished marker."""
    stage = case_dir / "runs" / "crashed" / "pretrain"
    stage.mkdir(parents=True)
    (stage / "train.log").write_text("step 10/80 | loss 5.1\n")
    checkpoint = stage / "checkpoint-40"
    shutil.copytree(
        inputs.shared / "pretrain", checkpoint, ignore=shutil.ignore_patterns(runs.FINISHED_MARKER, "*.md")
    )
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    if with_tokenizer:
        shutil.copytree(inputs.shared / "tokenizer", case_dir / "runs" / "crashed" / "tokenizer")


def killed_tokenizer(inputs, case_dir):
    """A tokenizer stage killed while writing tokenizer.json: no finished marker, half the file."""
    stage = case_dir / "runs" / "killed" / "tokenizer"
    shutil.copytree(inputs.shared / "tokenizer", stage, ignore=shutil.ignore_patterns(runs.FINISHED_MARKER))
    data = (stage / "tokenizer.json").read_bytes()
    (stage / "tokenizer.json").write_bytes(data[: len(data) // 2])


def cut_trainer_state(inputs, case_dir):
    """The newest checkpoint's trainer_state.json cut short (the Trainer writes it last, in place)."""
    checkpoint = case_dir / "out" / "checkpoint-40"
    shutil.copytree(
        inputs.shared / "pretrain", checkpoint, ignore=shutil.ignore_patterns(runs.FINISHED_MARKER, "*.md")
    )
    (checkpoint / "trainer_state.json").write_text('{"global_step": 40, "log_hist')


def corrupt_tokenizer(inputs, case_dir):
    shutil.copytree(inputs.shared / "tokenizer", case_dir / "tok")
    (case_dir / "tok" / "tokenizer.json").write_bytes(b"\x00\x01 not json")


def mismatched_config(inputs, case_dir):
    shutil.copytree(inputs.shared / "pretrain", case_dir / "model")
    config = json.loads((case_dir / "model" / "config.json").read_text())
    config["n_positions"] *= 2  # the position table no longer matches the saved one
    (case_dir / "model" / "config.json").write_text(json.dumps(config))


def corrupt_tokenizer_config(inputs, case_dir):
    shutil.copytree(inputs.shared / "tokenizer", case_dir / "tok")
    (case_dir / "tok" / "tokenizer_config.json").write_text('{"truncated')


def held_out_too_long(inputs, case_dir, seed: int = 0, rows: int = 50):
    """An Alpaca JSON array whose one held-out row (sft's split with --seed, --eval_fraction 0.02) is too long
    for the 64-token context while every training row fits."""
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    held_out = order[-1]
    data = [{"instruction": ("word " * 200 if i == held_out else f"Say {i}."), "output": f"{i}."} for i in range(rows)]
    (case_dir / "mine.json").write_text(json.dumps(data), encoding="utf-8")


def own_pairs(inputs, case_dir):
    rows = [
        {"prompt": f"What is {n} plus {n}?", "chosen": f"{2 * n}.", "rejected": f"{2 * n + 1}."} for n in range(20)
    ]
    (case_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_yaml(name: str, text: str):
    def prepare(inputs, case_dir):
        (case_dir / name).write_text(text)

    return prepare


CASES = [
    # ---- tokenizer/train.py: the text files it trains on
    Case(
        "missing file",
        "tokenizer",
        lambda i, d: ["--train_file", d / "nope.txt", "--output_dir", d / "tok"],
        ("--train_file", "nope.txt: no such file"),
    ),
    Case(
        "empty file",
        "tokenizer",
        lambda i, d: ["--train_file", i.empty, "--output_dir", d / "tok"],
        ("empty.txt: file is empty",),
    ),
    Case(
        "binary file",
        "tokenizer",
        lambda i, d: ["--train_file", i.binary, "--output_dir", d / "tok"],
        ("binary.txt: looks binary",),
        cli=True,
    ),
    Case(
        "non-UTF-8 file",
        "tokenizer",
        lambda i, d: ["--train_file", i.latin1, "--output_dir", d / "tok"],
        ("latin1.txt: not UTF-8",),
    ),
    Case(  # datasets logged its own "Failed to load JSON ..." line first, and ours said only that generating failed
        "a malformed line in a jsonl corpus",
        "tokenizer",
        lambda i, d: ["--train_file", i.malformed_jsonl, "--output_dir", d / "tok"],
        ("malformed.jsonl: could not be read as json (line 3 is not valid JSON",),
        cli=True,
    ),
    Case(  # the number's row was dropped without a word
        "a number in a jsonl text column",
        "tokenizer",
        lambda i, d: ["--train_file", d / "mixed.jsonl", "--output_dir", d / "tok"],
        ("mixed.jsonl: row 2: field 'text' must be text, got int",),
        prepare=write_yaml(
            "mixed.jsonl", '{"text": "To be, or not to be"}\n{"text": 42}\n{"text": "that is the question"}\n'
        ),
    ),
    Case(  # Python's json takes an escaped lone surrogate, Arrow's reader does not: it said "Trailing data" on line 1
        "a lone surrogate escape in a jsonl text row",
        "tokenizer",
        lambda i, d: ["--train_file", d / "surrogate.jsonl", "--output_dir", d / "tok"],
        ("surrogate.jsonl: could not be read as json (line 3 holds a lone surrogate escape",),
        prepare=write_yaml(
            "surrogate.jsonl",
            '{"text": "To be"}\n{"text": "or not \\ud83d\\ude00 to be"}\n{"text": "bad \\ud800 half"}\n',
        ),
    ),
    Case(
        "vocab too small",
        "tokenizer",
        lambda i, d: ["--train_file", i.corpus, "--vocab_size", 100, "--output_dir", d / "tok"],
        ("--vocab_size 100 is too small",),
    ),
    Case(
        "unknown config key",
        "tokenizer",
        lambda i, d: ["--config", d / "typo.yaml", "--train_file", i.corpus, "--output_dir", d / "tok"],
        ("typo.yaml: unknown key 'vocab_sise'", "did you mean 'vocab_size'"),
        prepare=write_yaml("typo.yaml", "vocab_sise: 512\n"),
    ),
    Case(
        "wrong type in YAML",
        "tokenizer",
        lambda i, d: ["--config", d / "types.yaml", "--train_file", i.corpus, "--output_dir", d / "tok"],
        ("types.yaml: argument --vocab_size", "invalid int value: 'lots'"),
        prepare=write_yaml("types.yaml", "vocab_size: lots\n"),
    ),
    Case(  # Arrow's JSON reader crashed the process (segfault, exit 139, nothing said)
        "a JSON-lines corpus whose row is null",
        "tokenizer",
        lambda i, d: ["--train_file", i.null_rows_jsonl, "--output_dir", d / "tok"],
        ("null_rows.jsonl: line 1 must be a JSON object, got null",),
        cli=True,
    ),
    Case(  # --overwrite replaced the run's tokenizer with an SFT model without a word
        "another stage's folder as --output_dir, with --overwrite",
        "sft",
        lambda i, d: [*sft_of_shared(i), "--output_dir", d / "tok", "--overwrite"],
        ("tok holds a tokenizer stage, not sft", "choose another --output_dir"),
        prepare=copy_stage("tokenizer", "tok"),
    ),
    Case(  # said "no such file or folder", which was untrue
        "a device as the training text",
        "tokenizer",
        lambda i, d: ["--train_file", "/dev/null", "--output_dir", d / "tok"],
        ("--train_file /dev/null: not a regular file or folder (a pipe or a device)",),
    ),
    Case(  # "cannot read the model config ... re-run the stage that wrote it": nothing was wrong with the folder
        "a tokenizer's folder as the model to fine-tune",
        "sft",
        lambda i, d: ["--preset", "tiny", "--model_name_or_path", i.shared / "tokenizer", "--output_dir", d / "out"],
        ("tokenizer holds a tokenizer stage, not a model", "finished pretrain stage"),
    ),
    Case(  # the last weight won, unsaid
        "a task weighted twice",
        "sft",
        lambda i, d: [*sft_of_shared(i), "--output_dir", d / "out", "--task_weights", "capital=1", "capital=2"],
        ("--task_weights names capital twice (capital=1, capital=2): give it once",),
    ),
    Case(  # the stage read "--max_steps 5" as one unknown flag, and suggested 'max_steps'
        "a stage flag and its value in one word with a space",
        "run_all",
        lambda i, d: ["--run_name", "x", "--stage_args", "sft:--max_steps 5"],
        ("--stage_args 'sft:--max_steps 5': join a flag to its value with '=': sft:--max_steps=5",),
    ),
    Case(
        "existing finished output kept",
        "tokenizer",
        lambda i, d: ["--train_file", i.corpus, "--output_dir", d / "tok"],
        ("already holds a finished run", "--overwrite"),
        prepare=copy_stage("tokenizer", "tok"),
    ),
    Case(
        "paths with spaces work",
        "tokenizer",
        lambda i, d: ["--train_file", i.spaced_corpus, "--vocab_size", 300, "--output_dir", d / "out dir" / "tok"],
        (),
        cli=True,
        succeeds=lambda d: d / "out dir" / "tok",
    ),
    Case(  # bytes from another locale: trained, then failed in a traceback saving the first JSON file
        "a run name that is not UTF-8",
        "tokenizer",
        lambda i, d: ["--preset", "tiny", "--run_name", "\udcff\udcfe"],  # as Python decodes such an argument
        ("--run_name b'\\xff\\xfe' is not valid UTF-8",),
    ),
    Case(  # OSError: File name too long, in a traceback
        "a run name longer than a file name",
        "tokenizer",
        lambda i, d: ["--preset", "tiny", "--run_name", "n" * 300],
        ("--run_name: the name nnnn", "is 300 bytes, longer than 240"),
    ),
    Case(  # the "-> folder" line printed across two lines
        "a run name with a tab",
        "tokenizer",
        lambda i, d: ["--preset", "tiny", "--run_name", "a\tb"],
        ("--run_name 'a\\tb' holds a line break or tab",),
    ),
    Case(  # Path("") is the current folder: the run was written beside the user's files, without a word
        "an empty FLUXCHAT_RUNS_DIR",
        "tokenizer",
        lambda i, d: ["--preset", "tiny", "--run_name", "x"],
        ("FLUXCHAT_RUNS_DIR is set but empty",),
        env={"FLUXCHAT_RUNS_DIR": ""},
    ),
    # ---- pipeline/pretrain.py
    Case(  # trained all its steps, then failed in a traceback writing config.yaml's record of the path
        "an --output_dir that is not UTF-8",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d)[:-2], "--output_dir", str(d / "pre_") + "\udcff"],
        ("--output_dir b'", "pre_\\xff' is not valid UTF-8"),
    ),
    Case(
        "unknown flag, one letter off",
        "pretrain",
        lambda i, d: ["--preset", "tiny", "--max_stepz", 3],
        ("unknown flag --max_stepz (did you mean 'max_steps'?)",),
        cli=True,
    ),
    Case(
        "unknown preset",
        "pretrain",
        lambda i, d: ["--preset", "tinny", "--run_name", "x"],
        ("unknown preset 'tinny'", "did you mean 'tiny'"),
    ),
    Case(
        "missing previous stage",
        "pretrain",
        lambda i, d: ["--preset", "tiny", "--run_name", "fresh", "--train_file", i.corpus],
        ("tokenizer/train.py", "--run_name fresh"),
    ),
    Case(
        "wrong type on the command line",
        "pretrain",
        lambda i, d: ["--preset", "tiny", "--learning_rate", "fast"],
        ("--learning_rate", "invalid float value: 'fast'"),
    ),
    Case(
        "tokenizer/model vocab mismatch",
        "pretrain",
        lambda i, d: [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            i.shared / "tokenizer",
            "--model_name_or_path",
            i.small_vocab_model,
            "--train_file",
            i.corpus,
            "--output_dir",
            d / "out",
        ],
        ("vocab_size 300", "use the tokenizer it was trained with"),
    ),
    Case(
        "context longer than the model's",
        "pretrain",
        lambda i, d: [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            i.shared / "tokenizer",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--block_size",
            128,
            "--train_file",
            i.corpus,
            "--output_dir",
            d / "out",
        ],
        ("--block_size 128", "context (64 positions)"),
    ),
    Case(  # a null line after good ones: the reader crashes where a block of lines starts with one
        "a JSON-lines corpus with a null line",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d)[:-4], "--train_file", i.null_line_jsonl, "--output_dir", d / "out"],
        ("null_line.jsonl: line 3 must be a JSON object, got null",),
    ),
    Case(  # transformers' "Unrecognized model ... Should have a `model_type` key", in a traceback
        "a tokenizer folder as the model to continue",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--model_name_or_path", i.shared / "tokenizer"],
        ("--model_name_or_path", "tokenizer: no model in it (no config.json)"),
        cli=True,
    ),
    Case(
        "a run folder as the model to continue",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--model_name_or_path", i.shared],
        ("is a run folder: give one of its stages' folders", "pretrain"),
    ),
    Case(  # the Trainer's constructor raised, in a traceback, after the stage folder was made
        "an unknown --report_to",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--report_to", "tensorbord"],
        ("--report_to tensorbord: unknown; choose from none, all,", "tensorboard"),
        cli=True,
    ),
    Case(
        "a --report_to whose package is not installed",
        "sft",
        lambda i, d: [*sft_of_shared(i), "--output_dir", d / "out", "--report_to", "clearml"],
        ("--report_to clearml: its package is not installed here",),
    ),
    Case(  # torch's "can't allocate memory: you tried to allocate 1099511627776 bytes", in a traceback
        "a model too large for the machine",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--block_size", 2**31],
        ("--block_size 2147483648", "the weights alone would take 1,024 GiB", "choose a smaller model"),
    ),
    Case(
        "unfinished checkpoints without --resume",
        "pretrain",
        lambda i, d: ["--preset", "tiny", "--run_name", "crashed", "--train_file", i.corpus, "--max_steps", 80],
        ("checkpoints of an unfinished run", "--resume"),
        prepare=unfinished_pretrain,
    ),
    Case(
        "previous stage killed mid-save",
        "pretrain",
        lambda i, d: ["--preset", "tiny", "--run_name", "killed", "--train_file", i.corpus],
        ("killed/tokenizer holds no finished tokenizer output", "tokenizer/train.py"),
        prepare=killed_tokenizer,
    ),
    # ---- pipeline/sft.py: instruction data, line by line
    Case(  # read only by the quote/speaker tasks: a mistyped path passed unseen wherever they were left out
        "a missing --corpus_file without the tasks that read it",
        "sft",
        lambda i, d: [*sft_of_shared(i), "--tasks", "copy", "--corpus_file", d / "nope.txt", "--output_dir", d / "o"],
        ("--corpus_file", "nope.txt does not exist: give the text file the quote/speaker tasks draw lines from"),
    ),
    Case(
        "a folder as --corpus_file (evaluate)",
        "evaluate",
        lambda i, d: [i.shared / "pretrain", "--tasks", "copy", "--corpus_file", d, "--output_file", d / "e.json"],
        ("--corpus_file", "is a folder: give the text file"),
    ),
    Case(
        "JSONL with one malformed line",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            i.malformed_jsonl,
            "--output_dir",
            d / "out",
        ],
        ("malformed.jsonl: line 3 is not valid JSON",),
        cli=True,
    ),
    Case(
        "row missing a field",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            i.missing_field_jsonl,
            "--output_dir",
            d / "out",
        ],
        ("missing_field.jsonl: line 2: missing field 'output'",),
    ),
    Case(
        "wrong field type",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            i.wrong_type_jsonl,
            "--output_dir",
            d / "out",
        ],
        ("wrong_type.jsonl: line 1: messages[1].content must be a string, got int",),
    ),
    Case(
        "no built-in examples",
        "sft",
        lambda i, d: ["--preset", "tiny", "--builtin_examples", 0, "--output_dir", d / "out"],  # refused as parsed
        ("--builtin_examples must be at least 1, got 0",),
    ),
    Case(
        "task weight of zero",
        "sft",
        lambda i, d: ["--preset", "tiny", "--task_weights", "capital=0", "--output_dir", d / "out"],  # as parsed
        ("--task_weights 'capital=0'", "weight > 0"),
    ),
    Case(
        "task weight for a task not trained on",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--tasks",
            "copy",
            "upper",
            "--task_weights",
            "capital=0.5",
            "--output_dir",
            d / "out",
        ],
        ("--task_weights names capital, not among the tasks trained on (copy, upper)",),
    ),
    Case(
        "non-UTF-8 JSONL",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            i.latin1_jsonl,
            "--output_dir",
            d / "out",
        ],
        ("latin1.jsonl", "UTF-8"),
    ),
    Case(
        "conversations longer than the context",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            i.long_jsonl,
            "--output_dir",
            d / "out",
        ],
        ("no conversation fits in 64 tokens (the model's context",),
    ),
    Case(
        "sft without pretraining",
        "sft",
        lambda i, d: ["--preset", "tiny", "--run_name", "fresh"],
        ("runs/fresh/pretrain does not exist", "pretrain.py"),
    ),
    # ---- pipeline/reward.py: preference pairs
    Case(
        "chosen == rejected everywhere",
        "reward",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            i.identical_pairs,
            "--output_dir",
            d / "out",
        ],
        ("identical.jsonl", "chosen == rejected"),
        cli=True,
    ),
    Case(
        "hh-rlhf transcript with no Assistant turn",
        "reward",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            i.no_assistant_pairs,
            "--output_dir",
            d / "out",
        ],
        ("no_assistant.jsonl: line 2: field 'rejected' has no", "Assistant:"),
    ),
    # ---- pipeline/ppo.py
    Case(
        "ppo without a reward model",
        "ppo",
        lambda i, d: ["--preset", "tiny", "--run_name", "fresh", "--sft_model_path", i.shared / "pretrain"],
        ("runs/fresh/reward does not exist", "reward.py"),
        cli=True,
    ),
    Case(  # TRL's PPOTrainer counts episodes: it trained the recipe's 50 updates, its card saying max_steps 2
        "ppo --max_steps",
        "ppo",
        lambda i, d: ["--preset", "tiny", "--run_name", "fresh", "--max_steps", 2],
        ("--max_steps 2: PPO's length is --total_episodes",),
    ),
    Case(
        "reward model with another tokenizer",
        "ppo",
        ppo_rewarded_by(lambda i: i.small_vocab_model),
        ("--reward_model_path", "different tokenizer"),
    ),
    Case(
        "ppo --reward_model_path naming a language model (its score head would be random)",
        "ppo",
        ppo_rewarded_by(lambda i: i.shared / "pretrain"),
        ("--reward_model_path", "is not a reward model", "score head (score.weight) would start random"),
    ),
    Case(  # the run's own folder, a file: "finish it with ... --run_name default", naming another run
        "ppo --reward_model_path naming a run folder",
        "ppo",
        ppo_rewarded_by(lambda i: i.shared),
        ("is a run folder: give its reward stage, which it does not hold finished",),
    ),
    Case(  # `runs/dmeo`: the shape of a Hub id, so it reached AutoTokenizer and its OSError traceback
        "ppo --reward_model_path naming a mistyped run folder",
        "ppo",
        ppo_rewarded_by(lambda i: "runs/no-such-run"),
        ("--reward_model_path runs/no-such-run: cannot load the tokenizer", "no such folder here"),
    ),
    Case(
        "evaluate --reward_model naming a mistyped run folder",
        "evaluate",
        lambda i, d: [i.shared / "pretrain", "--reward_model", "runs/no-such-run", "--output_file", d / "e.json"],
        ("--reward_model runs/no-such-run: cannot load the tokenizer", "no such folder here"),
    ),
    Case(
        "ppo --reward_model_path naming a file",
        "ppo",
        ppo_rewarded_by(lambda i: i.shared / "pretrain" / "config.json"),
        ("config.json is a file: give the folder of a finished reward stage",),
    ),
    Case(
        "ppo --reward_model_path naming an empty folder",
        "ppo",
        lambda i, d: ppo_rewarded_by(lambda _: d / "empty")(i, d),
        ("holds no finished reward output (no stage_complete.json) and no saved model",),
        prepare=lambda i, d: (d / "empty").mkdir(),
    ),
    # ---- pipeline/evaluate.py
    Case(
        "evaluate a missing model",
        "evaluate",
        lambda i, d: [d / "no model here", "--output_file", d / "eval.json"],
        ("no model here: no such folder",),
    ),
    Case(
        "an --output_file that is a FIFO (evaluate)",
        "evaluate",
        lambda i, d: [i.shared / "pretrain", "--output_file", d / "report.fifo"],
        ("--output_file", "report.fifo is not a regular file (a device, FIFO or socket)"),
        prepare=lambda i, d: os.mkfifo(d / "report.fifo"),  # was replaced by the report (so would /dev/null be)
    ),
    Case(
        "evaluate an unfinished run",
        "evaluate",
        lambda i, d: [d / "runs" / "crashed", "--output_file", d / "eval.json"],
        ("crashed: neither a model folder", "finished"),
        prepare=unfinished_pretrain,
    ),
    # ---- pipeline/generate.py
    Case(
        "prompt of only whitespace",
        "generate",
        lambda i, d: [i.shared / "pretrain", "--prompt", "   \t "],
        ("--prompt is only whitespace",),
        cli=True,
    ),
    Case(
        "reply longer than the context",
        "generate",
        lambda i, d: [i.shared / "pretrain", "--prompt", "ROMEO:", "--max_new_tokens", 64],
        ("--max_new_tokens 64", "context of 64"),
    ),
    Case(
        "replies longer than the context (evaluate)",
        "evaluate",
        lambda i, d: [i.shared / "pretrain", "--max_new_tokens", 100_000, "--output_file", d / "eval.json"],
        ("--max_new_tokens 100000 must be below the model's context of 64 tokens",),  # was accepted, 24 s of work
    ),
    Case(
        "a Hub id with the Hub kept out (generate)",
        "generate",
        lambda i, d: ["someone/fluxchat-tiny", "--prompt", "hi"],
        ("someone/fluxchat-tiny", "HF_HUB_OFFLINE=1 keeps the Hub out", "or pass a folder"),
    ),
    # ---- pipeline/chat.py
    Case(
        "pickle weights refused",
        "chat",
        lambda i, d: [i.pickle_model],
        ("only safetensors",),
        cli=True,
        stdin="hello\n",
    ),
    Case("chat with a missing model", "chat", lambda i, d: [d / "gone"], ("gone: no such folder",)),
    # ---- app.py
    Case(
        "malformed --auth",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain", "--auth", "admin"],
        ("--auth must look like user:password",),
    ),
    # Values from the environment (a Space's settings): the errors blamed --auth and --port, which nobody gave,
    # and a port that is no number was a traceback inside gradio's import.
    Case(
        "an empty FLUXCHAT_AUTH",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain"],
        ("FLUXCHAT_AUTH is empty: give user:password",),
        env={"FLUXCHAT_AUTH": ""},
    ),
    Case(
        "a blank user name in --auth",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain", "--auth", " :secret"],
        ("--auth must look like user:password (neither of them blank)",),
    ),
    Case(
        "GRADIO_SERVER_PORT out of range",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain"],
        ("GRADIO_SERVER_PORT must be between 1 and 65535, got 99999",),
        env={"GRADIO_SERVER_PORT": "99999"},
    ),
    Case(
        "GRADIO_SERVER_PORT not a number",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain"],
        ("GRADIO_SERVER_PORT='abc' is not a port number: unset it, or give 1-65535",),
        cli=True,
        env={"GRADIO_SERVER_PORT": "abc"},
    ),
    Case(
        "reward model without a second model",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain", "--reward_model", i.shared / "pretrain"],
        ("--reward_model scores the Compare tab's replies: give --compare_model too",),
    ),
    # ---- pipeline/run_all.py
    Case(
        "unknown stage",
        "run_all",
        lambda i, d: ["--run_name", "x", "--stages", "tokenizer", "finetune"],
        ("--stages: unknown stage(s) finetune; choose from tokenizer,",),
    ),
    Case(
        "run_all unknown preset",
        "run_all",
        lambda i, d: ["--preset", "huge", "--run_name", "x"],
        ("unknown preset 'huge'",),
    ),
    # ---- pipeline/push.py
    Case(
        "push while offline",
        "push",
        lambda i, d: [d / "run", "--hub_user", "alice"],
        ("offline mode",),
        cli=True,
        prepare=lambda i, d: shutil.copytree(i.shared, d / "run"),
        env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_notarealtoken0000"},
    ),
    Case(
        "push with a malformed user",
        "push",
        lambda i, d: [i.shared, "--hub_user", "alice/bob"],
        ("--hub_user 'alice/bob'",),
    ),
    Case(
        "push a run with nothing finished",
        "push",
        lambda i, d: [d / "runs" / "crashed", "--hub_user", "alice"],
        ("no finished stage to push",),
        prepare=lambda i, d: unfinished_pretrain(i, d, with_tokenizer=False),
    ),
    Case(
        "push given one stage's folder instead of its run",
        "push",
        lambda i, d: [i.shared / "pretrain", "--hub_user", "alice"],
        ("pretrain is one stage of a run", "--stages pretrain pushes that stage alone"),
    ),
    # ---- defects found by this table (see DEFECTS): strict, so a fix turns them into failures that ask to move them up
    Case(
        "chat model smaller than its tokenizer",
        "chat",
        lambda i, d: [i.mismatched_model],
        ("the model embeds 300 tokens but its tokenizer has", "(vocab_size mismatch)"),
        stdin="hello\n",
    ),
    Case(
        "evaluate model smaller than its tokenizer",
        "evaluate",
        lambda i, d: [i.mismatched_model, "--output_file", d / "eval.json", "--n_per_task", 1],
        ("the model embeds 300 tokens but its tokenizer has", "(vocab_size mismatch)"),
    ),
    Case(
        "half-written weights file (generate)",
        "generate",
        lambda i, d: [i.truncated_model, "--prompt", "ROMEO:"],
        ("cannot load a model from", "truncated/model.safetensors (", "deserializing header"),
    ),
    Case(
        "half-written weights file (sft)",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.truncated_model,
            "--corpus_file",
            i.corpus,
            "--builtin_examples",
            64,
            "--output_dir",
            d / "out",
        ],
        ("cannot load a model from", "truncated/model.safetensors (", "deserializing header"),
    ),
    Case(
        "checkpoint with a cut trainer_state.json",
        "pretrain",
        lambda i, d: [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            i.shared / "tokenizer",
            "--train_file",
            i.corpus,
            "--output_dir",
            d / "out",
            "--resume",
            "--max_steps",
            80,
        ],
        ("--resume: no complete checkpoint in", "(complete = its trainer_state.json is readable)"),
        prepare=cut_trainer_state,
    ),
    Case(  # the line named tokenizer.json, which was whole
        "corrupt tokenizer_config.json",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d)[:2], "--tokenizer_name_or_path", d / "tok", *tiny_pretrain(i, d)[4:]],
        ("cannot load the tokenizer", "tok/tokenizer_config.json ("),
        prepare=corrupt_tokenizer_config,
    ),
    Case(
        "corrupt tokenizer.json",
        "pretrain",
        lambda i, d: [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            d / "tok",
            "--train_file",
            i.corpus,
            "--output_dir",
            d / "out",
        ],
        ("cannot load the tokenizer", "tok/tokenizer.json (", "re-run the stage that wrote it"),
        prepare=corrupt_tokenizer,
    ),
    Case(
        "run_all with a missing corpus",
        "run_all",
        lambda i, d: ["--run_name", "x", "--train_file", d / "nope.txt"],
        ("nope.txt: no such file",),
    ),
    # ---- issue 12: every number checked before anything is written, NaN and infinity included (fluxchat/validation.py)
    Case(
        "negative learning rate",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--learning_rate", "-0.001"],
        ("--learning_rate must be > 0, got -0.001",),
    ),
    Case(
        "zero block size",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--block_size", 0],
        ("--block_size must be >= 2, got 0",),
    ),
    Case(  # accepted before: it trained for minutes on 18 GB, its validation (shorter than one block) skipped unsaid
        "block longer than the validation text",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--block_size", 100000],
        ("not longer than one block (--block_size 100000)", "--validation_fraction"),
    ),
    Case(
        "NaN validation fraction",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--validation_fraction", "nan"],
        ("--validation_fraction must be a finite number, got nan",),
    ),
    Case(
        "negative PPO response length",
        "ppo",
        lambda i, d: ["--preset", "tiny", "--run_name", "fresh", "--response_length", -4],
        ("--response_length must be >= 1, got -4",),
    ),
    Case(
        "NaN temperature",
        "generate",
        lambda i, d: [i.shared / "pretrain", "--prompt", "ROMEO:", "--temperature", "nan"],
        ("--temperature must be a finite number, got nan",),
    ),
    Case(
        "infinite temperature",
        "generate",
        lambda i, d: [i.shared / "pretrain", "--prompt", "ROMEO:", "--temperature", "inf"],
        ("--temperature must be a finite number, got inf",),
    ),
    Case(  # blamed on a flag nobody typed, without naming the file
        "NaN temperature in a YAML file (chat)",
        "chat",
        lambda i, d: [i.shared / "pretrain", "--config", d / "chat.yaml"],
        ("chat.yaml: --temperature must be a finite number, got nan",),
        prepare=lambda i, d: (d / "chat.yaml").write_text("temperature: .nan\n"),
        stdin="hi\n",
    ),
    Case(  # it was pulled to 2 (a client's bound) and sampled there unsaid
        "chat --temperature above the chat's bound",
        "chat",
        lambda i, d: [i.shared / "pretrain", "--temperature", 5],
        ("--temperature 5: chat and the app take 0 to 2",),
        stdin="hi\n",
    ),
    Case(
        "app --top_p below the app's bound",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain", "--top_p", 0.01],
        ("--top_p 0.01: chat and the app take 0.05 to 1",),
    ),
    Case(  # int(1e303 * 1024 * 1024): OverflowError once the models had loaded
        "app --feedback_max_mb past any file system",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain", "--collect_feedback", "--feedback_max_mb", 1e303],
        ("--feedback_max_mb must be above 0 and at most 1,000,000, got 1e+303",),
    ),
    Case(  # sent as a system turn of spaces, which changed the replies
        "chat --system of spaces",
        "chat",
        lambda i, d: [i.shared / "pretrain", "--system", "   "],
        ("--system is only whitespace",),
        stdin="hi\n",
    ),
    Case(  # "--model   : no such folder", a flag nobody gave
        "FLUXCHAT_MODEL of spaces",
        "app",
        lambda i, d: [],
        ("FLUXCHAT_MODEL    : no such folder",),
        env={"FLUXCHAT_MODEL": "   "},
    ),
    Case(  # --prompt was ignored without a word
        "generate --interactive with --prompt",
        "generate",
        lambda i, d: [i.shared / "pretrain", "--interactive", "--prompt", "KING:"],
        ("--prompt and --interactive: give one",),
    ),
    Case(  # the same text printed three times
        "generate --num_samples with greedy decoding",
        "generate",
        lambda i, d: [i.shared / "pretrain", "--temperature", 0, "--num_samples", 3],
        ("--num_samples 3 with greedy decoding (--temperature 0) gives the same text each time",),
    ),
    Case(  # the flag won, unsaid
        "chat given its model twice",
        "chat",
        lambda i, d: [i.shared / "pretrain", "--model", i.shared / "sft"],
        ("--model given twice: as the first argument (", "give one"),
        stdin="hi\n",
    ),
    Case(  # transformers' message ends "but found" on its first line: the strategies it found were cut off
        "a recipe's load_best_model_at_end against --eval_strategy no",
        "pretrain",
        lambda i, d: ["--preset", "small", "--run_name", "p", "--eval_strategy", "no", "--output_dir", d / "o"],
        ("--load_best_model_at_end requires the save and eval strategy to match", "but found - Evaluation strategy"),
    ),
    # ---- issue 12: outputs checked before the work
    Case(
        "evaluate --output_file naming a folder",
        "evaluate",
        lambda i, d: [i.shared / "pretrain", "--output_file", d],
        ("--output_file", "is a folder: name a file"),
        cli=True,
    ),
    Case(
        "evaluate --output_file under a file",
        "evaluate",
        lambda i, d: [i.shared / "pretrain", "--output_file", d / "taken.txt" / "eval.json"],
        ("taken.txt is a file",),
        prepare=write_yaml("taken.txt", "mine\n"),
    ),
    Case(
        "--output_dir under a file",
        "pretrain",
        lambda i, d: [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            i.shared / "tokenizer",
            "--train_file",
            i.corpus,
            "--output_dir",
            d / "taken.txt" / "out",
        ],
        ("taken.txt is a file",),
        prepare=write_yaml("taken.txt", "mine\n"),
    ),
    # ---- issue 12: model folders and data sources
    Case(
        "pickle-only weights (pretrain --model_name_or_path)",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--model_name_or_path", i.pickle_model],
        ("pytorch_model.bin", "only safetensors weights load"),
        cli=True,
    ),
    Case(  # transformers' LOAD REPORT table stood above the line, which said only "look at the above report"
        "a config.json that does not match the weights (generate)",
        "generate",
        lambda i, d: [d / "model", "--prompt", "ROMEO:"],
        ("config.json does not match the weights: transformer.wpe.weight is [", "by config.json"),
        cli=True,
        prepare=mismatched_config,
    ),
    Case(
        "pickle-only weights (generate)",
        "generate",
        lambda i, d: [i.pickle_model, "--prompt", "ROMEO:"],
        ("pytorch_model.bin", "only safetensors weights load"),
    ),
    Case(
        "app --model naming a reward model",
        "app",
        lambda i, d: ["--model", i.reward_model],
        ("is a reward model", "--reward_model"),
    ),
    Case(
        "app --host that is no address",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain", "--host", "256.1.1.1"],
        ("--host 256.1.1.1 is not a valid IPv4 address",),
        cli=True,
    ),
    Case(
        "sft --dataset naming a folder",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            i.dataset_folder,
            "--output_dir",
            d / "out",
        ],
        ("is a folder: a data source is one .jsonl, .json or .parquet file", "it holds train.jsonl"),
    ),
    Case(
        "run_all: a failing stage ends with our line",
        "run_all",
        lambda i, d: ["--run_name", "x", "--stages", "pretrain", "--train_file", i.corpus, "--with_facts", "false"],
        ("stage pretrain failed",),
        cli=True,
        alone=False,  # the stage's own error line comes first, by design
    ),
    # ---- issue 12: a user's own data, offline (success cases: the stage finishes and says what it left out)
    Case(
        "sft on own data: held-out row too long, corpus not a play script",
        "sft",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            d / "mine.json",
            "--corpus_file",
            i.one_line_corpus,
            "--seed",
            0,
            "--max_steps",
            2,
            "--eval_steps",
            1,
            "--eval_examples",
            10,
            "--eval_baseline",
            "false",
            "--output_dir",
            d / "out",
        ],
        (),
        cli=True,
        prepare=held_out_too_long,
        succeeds=lambda d: d / "out",
        notes=(
            "no `NAME:` speaker blocks found",
            "evaluation skips the quote/speaker tasks",
            "none of the 1 held-out conversations fits",
            "no eval loss",
        ),
    ),
    Case(
        "reward on own pairs, corpus not a play script",
        "reward",
        lambda i, d: [
            "--preset",
            "tiny",
            "--model_name_or_path",
            i.shared / "pretrain",
            "--dataset",
            d / "pairs.jsonl",
            "--corpus_file",
            i.one_line_corpus,
            "--max_steps",
            2,
            "--eval_examples",
            10,
            "--output_dir",
            d / "out",
        ],
        (),
        cli=True,
        prepare=own_pairs,
        succeeds=lambda d: d / "out",
        notes=("evaluation skips the quote/speaker tasks",),
    ),
    Case(
        "run_all on a corpus that is not a play script",
        "run_all",
        lambda i, d: [
            "--run_name",
            "story",
            "--stages",
            "tokenizer",
            "--train_file",
            i.one_line_corpus,
            "--with_facts",
            "false",
        ],
        (),
        cli=True,
        succeeds=lambda d: d / "runs" / "story" / "tokenizer",
        notes=("cannot use", "no `NAME:` speaker blocks", "draw their lines from tinyshakespeare"),
    ),
    # ---- found trying odd flags as a new user would (2026-12-06)
    Case(
        "ppo at temperature 0",
        "ppo",
        lambda i, d: ["--preset", "tiny", "--run_name", "fresh", "--temperature", 0],
        ("--temperature must be > 0, got 0",),
    ),
    Case(
        "sft from a reward model",
        "sft",
        lambda i, d: [*sft_of_shared(i), "--model_name_or_path", i.reward_model, "--output_dir", d / "out"],
        ("is a reward model (GPT2ForSequenceClassification", "not a language model"),
    ),
    Case(
        "pretrain continuing from a reward model",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--model_name_or_path", i.reward_model],
        ("is a reward model (GPT2ForSequenceClassification", "not a language model"),
    ),
    Case(
        "generate from a reward model",
        "generate",
        lambda i, d: [i.reward_model, "--prompt", "ROMEO:"],
        ("is a reward model", "not a language model"),
    ),
    Case(
        "sft --loss_type that TRL does not know",
        "sft",
        lambda i, d: ["--preset", "tiny", "--run_name", "fresh", "--loss_type", "mse"],
        ("--loss_type mse: choose from nll, chunked_nll, dft",),
    ),
    Case(
        "sft --mix_text_file that is binary",
        "sft",
        lambda i, d: ["--preset", "tiny", "--run_name", "fresh", "--mix_text_file", i.binary],
        ("--mix_text_file", "looks binary"),
    ),
    Case(
        "sft --output_dir where no folder can be made",
        "sft",
        lambda i, d: [*sft_of_shared(i), "--output_dir", "/proc/fluxchat-test/sft", "--max_steps", 1],
        ("--output_dir /proc/fluxchat-test/sft: cannot create",),
    ),
    Case(
        "evaluate --output_file where no file can be written",
        "evaluate",
        lambda i, d: [i.shared / "pretrain", "--tasks", "copy", "--n_per_task", 1, "--output_file", "/proc/x.json"],
        ("--output_file /proc/x.json: cannot write it",),
    ),
    # ---- a system message with no room for a message, an accelerate config accelerate cannot read (2026-12-06)
    Case(
        "chat --system longer than the context",
        "chat",
        lambda i, d: [i.shared, "--system", "word " * 40],  # within the 64-token context, but no room left
        ("--system is", "leaves no room for a message"),
        stdin="hello\n",
    ),
    Case(
        "app --system longer than the context",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain", "--system", "word " * 40],
        ("--system is", "leaves no room for a message"),
    ),
    Case(  # "shorten it or lower --max_new_tokens", though no reply length could make room (2026-12-07)
        "chat --system longer than the whole context",
        "chat",
        lambda i, d: [i.shared, "--system", "word " * 200],
        ("--system is", "longer than the model's context of 64: shorten it"),
        stdin="hello\n",
    ),
    Case(
        "run_all --accelerate_config without a distributed_type",
        "run_all",
        lambda i, d: ["--run_name", "x", "--accelerate_config", d / "accelerate.yaml", "--train_file", i.corpus],
        ("--accelerate_config", "`distributed_type` must be specified"),
        prepare=lambda i, d: (d / "accelerate.yaml").write_text("num_processes: 2\n"),
    ),
    Case(  # accelerate read it, then failed launching pretraining in a traceback, the tokenizer already run
        "run_all --accelerate_config with num_processes that is no number",
        "run_all",
        lambda i, d: ["--run_name", "x", "--accelerate_config", d / "accelerate.yaml", "--train_file", i.corpus],
        ("--accelerate_config", "num_processes must be a whole number, got 'abc'"),
        prepare=lambda i, d: (d / "accelerate.yaml").write_text("distributed_type: 'NO'\nnum_processes: abc\n"),
    ),
    Case(
        "sft --lora_target_modules naming no module",
        "sft",
        lambda i, d: [
            *sft_of_shared(i),
            "--use_peft",
            "--lora_target_modules",
            "c_attn",
            "attn_proj",
            "--max_steps",
            1,
        ],
        ("--lora_target_modules attn_proj: no module of the model", "c_attn c_fc c_proj"),
    ),
    Case(
        "reward --lora_target_modules naming a layer norm",
        "reward",
        lambda i, d: [
            *sft_of_shared(i),
            *("--output_dir", d / "out", "--use_peft", "--lora_target_modules", "ln_1", "--max_steps", 1),
        ],
        ("--lora_target_modules ln_1: a LayerNorm, which LoRA cannot adapt",),
    ),
    Case(
        "ppo --total_episodes 0",
        "ppo",
        lambda i, d: [*ppo_rewarded_by(lambda i: i.reward_model)(i, d), "--total_episodes", 0],
        ("--total_episodes must be >= 1, got 0",),
    ),
    Case(
        "app --feedback_file that cannot be written",
        "app",
        lambda i, d: [
            *("--model", i.shared / "pretrain", "--compare_model", i.shared / "pretrain", "--collect_feedback"),
            *("--feedback_file", "/proc/fluxchat-feedback.jsonl"),
        ],
        ("--feedback_file: cannot write the feedback file /proc/fluxchat-feedback.jsonl",),
    ),
    Case(  # its own one-line error is the stage's (a subprocess); run_all's last line names the stage
        "run_all --stages ppo on a run without SFT",
        "run_all",
        lambda i, d: ["--run_name", "x", "--stages", "ppo"],
        ("stage ppo failed",),  # and, as for every case, nothing written: not even the run's data/ texts
    ),
    Case(
        "a YAML list for a one-value key",
        "sft",
        lambda i, d: ["--config", d / "list.yaml", "--run_name", "x"],
        ("list.yaml: learning_rate takes one value, got a list of 2",),
        prepare=lambda i, d: (d / "list.yaml").write_text("learning_rate: [0.001, 0.002]\n"),
    ),
    Case(
        "a flag given two values",
        "sft",
        lambda i, d: [*sft_of_shared(i), "--learning_rate", 0.001, 0.002],
        ("unexpected value(s) '0.002': a flag was given more values than it takes",),
    ),
    # ---- values a library rejected in a traceback, or that were silently ignored (2026-12-06)
    Case(
        "evaluate --corpus_file not UTF-8",
        "evaluate",
        lambda i, d: [
            i.shared / "pretrain",
            "--n_per_task",
            1,
            "--corpus_file",
            i.latin1,
            "--output_file",
            d / "e.json",
        ],
        (
            "--corpus_file",
            "latin1.txt: not UTF-8 text",
        ),
    ),
    Case(
        "ppo --num_mini_batches not dividing the rollout batch",
        "ppo",
        lambda i, d: [*ppo_rewarded_by(lambda i: i.reward_model)(i, d), "--num_mini_batches", 64],
        ("--num_mini_batches 64 must divide the rollout batch of 16",),
    ),
    Case(  # TRL asserted it in a traceback once the models had loaded
        "ppo --whiten_rewards on mini-batches under 8",
        "ppo",
        lambda i, d: [*ppo_rewarded_by(lambda i: i.reward_model)(i, d), "--whiten_rewards", "--num_mini_batches", 4],
        ("--whiten_rewards needs mini-batches of at least 8 prompts per process, got 4",),
    ),
    Case(
        "ppo --local_rollout_forward_batch_size 0",
        "ppo",
        lambda i, d: [*ppo_rewarded_by(lambda i: i.reward_model)(i, d), "--local_rollout_forward_batch_size", 0],
        ("--local_rollout_forward_batch_size must be >= 1, got 0",),
    ),
    Case(
        "ppo --stop_token_id next to the recipe's stop_token",
        "ppo",
        lambda i, d: [*ppo_rewarded_by(lambda i: i.reward_model)(i, d), "--stop_token_id", 5],
        ("--stop_token_id 5 and --stop_token eos",),
    ),
    Case(
        "pretrain --n_head 0",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--n_head", 0],
        ("--n_head must be >= 1, got 0",),
    ),
    Case(
        "pretrain --attn_implementation unknown",
        "pretrain",
        lambda i, d: [*tiny_pretrain(i, d), "--attn_implementation", "bogus"],
        ("--attn_implementation 'bogus'", "sdpa, eager"),
    ),
    Case(
        "sft --task_weights summing to infinity",
        "sft",
        lambda i, d: ["--preset", "tiny", "--task_weights", "capital=1e308", "upper=1e308", "--output_dir", d / "out"],
        ("--task_weights 'capital=1e308'", "weight > 0 (at most 1,000,000)"),
    ),
    Case(
        "tokenizer --output_dir empty",
        "tokenizer",
        lambda i, d: ["--train_file", i.corpus, "--output_dir", ""],
        ("--output_dir is empty",),
    ),
    Case(  # Path("") is ".": this checkout's own folder
        "sft --output_dir empty",
        "sft",
        lambda i, d: ["--preset", "tiny", "--output_dir", ""],
        ("--output_dir is empty: give a folder, or leave it out to write to runs/<run_name>/sft",),
    ),
    Case(
        "app --auth empty",
        "app",
        lambda i, d: ["--model", i.shared / "pretrain", "--auth", ""],
        ("--auth is empty",),
    ),
    Case(
        "dpo --loss_weights nan",
        "dpo",
        lambda i, d: ["--preset", "tiny", "--loss_weights", "nan", 1, "--output_dir", d / "out"],
        ("--loss_weights nan 1: each must be a finite number >= 0",),
        cli=True,
    ),
    Case(
        "dpo --label_smoothing 0.6",
        "dpo",
        lambda i, d: ["--preset", "tiny", "--label_smoothing", 0.6, "--output_dir", d / "out"],
        ("--label_smoothing must be in [0, 0.5), got 0.6",),
    ),
]
DEFECTS = {  # case -> what goes wrong today (none known: add a case here as a strict xfail when you find one)
}


def fingerprint(*folders: Path) -> dict[str, str]:
    """Every file under `folders` -> hash of its bytes: equal fingerprints mean nothing was written."""
    prints = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            prints[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return prints


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory) -> SimpleNamespace:
    """Bad (and a few good) input files shared by the cases, which only read them."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    spaced = root / "my data" / "tiny shakespeare.txt"
    spaced.parent.mkdir()
    shutil.copy(corpus, spaced)
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("Ça va? Très bien, naïve café.\n".encode("latin-1") * 50)

    def jsonl(name: str, lines: list) -> Path:
        path = root / name
        path.write_text(
            "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
        )
        return path

    good = {"instruction": "Say hi.", "output": "Hi!"}
    transcript = "\n\nHuman: What is 2+2?\n\nAssistant: "
    paths = SimpleNamespace(
        shared=tiny_run,
        corpus=corpus,
        spaced_corpus=spaced,
        empty=root / "empty.txt",
        binary=root / "binary.txt",
        latin1=root / "latin1.txt",
        malformed_jsonl=jsonl("malformed.jsonl", [good, good, '{"instruction": "Say hi.", "output": "Hi!"', good]),
        missing_field_jsonl=jsonl("missing_field.jsonl", [good, {"instruction": "Say hi.", "outputs": "Hi!"}]),
        wrong_type_jsonl=jsonl(
            "wrong_type.jsonl",
            [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": 4}]}],
        ),
        long_jsonl=jsonl("long.jsonl", [{"instruction": "word " * 200, "output": "answer " * 50}] * 3),
        null_rows_jsonl=jsonl("null_rows.jsonl", ["null", "null"]),
        null_line_jsonl=jsonl("null_line.jsonl", [{"text": "To be."}, {"text": "Or not."}, "null"]),
        identical_pairs=jsonl(
            "identical.jsonl", [{"prompt": f"Q{n}?", "chosen": "Same.", "rejected": "Same."} for n in range(6)]
        ),
        no_assistant_pairs=jsonl(
            "no_assistant.jsonl",
            [
                {"chosen": transcript + "4.", "rejected": transcript + "5."},
                {"chosen": transcript + "4.", "rejected": "\n\nHuman: What is 2+2? Tell me."},
            ],
        ),
    )
    paths.latin1_jsonl = root / "latin1.jsonl"
    paths.latin1_jsonl.write_bytes('{"instruction": "Café?", "output": "Oui."}\n'.encode("latin-1"))

    # A model whose vocabulary (300) is smaller than the shared tokenizer's, saved with its own 300-token tokenizer.
    from tokenizer import train

    small = root / "small_vocab"
    train.main(["--train_file", corpus, "--vocab_size", 300, "--output_dir", small])
    (small / runs.FINISHED_MARKER).unlink()  # a plain model folder, as downloaded
    config = dict(n_positions=64, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, **config)).save_pretrained(small)
    paths.small_vocab_model = small
    # The same small model next to the shared (1024-token) tokenizer: ids the embedding cannot look up.
    paths.mismatched_model = root / "mismatched"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, **config)).save_pretrained(paths.mismatched_model)
    AutoTokenizer.from_pretrained(tiny_run / "tokenizer").save_pretrained(paths.mismatched_model)
    # Pickled weights only (what an untrusted download may carry): must never be unpickled.
    paths.pickle_model = root / "pickle_model"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1024, **config))
    model.config.save_pretrained(paths.pickle_model)
    torch.save(model.state_dict(), paths.pickle_model / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_run / "tokenizer").save_pretrained(paths.pickle_model)
    # A crash or an interrupted download leaves half a weights file.
    paths.truncated_model = root / "truncated"
    shutil.copytree(tiny_run / "pretrain", paths.truncated_model)
    weights = paths.truncated_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # A reward model folder (one-score sequence classifier), as the reward stage saves one.
    from transformers import AutoModelForSequenceClassification

    paths.reward_model = root / "reward_model"
    AutoModelForSequenceClassification.from_pretrained(tiny_run / "pretrain", num_labels=1).save_pretrained(
        paths.reward_model
    )
    AutoTokenizer.from_pretrained(tiny_run / "pretrain").save_pretrained(paths.reward_model)
    # A cloned dataset repo: a folder of data files.
    paths.dataset_folder = root / "dataset_repo"
    paths.dataset_folder.mkdir()
    shutil.copy(paths.missing_field_jsonl, paths.dataset_folder / "train.jsonl")
    # A corpus with no line breaks at all (and so no `NAME:` speaker blocks): a story, not a play script.
    paths.one_line_corpus = root / "one_line.txt"
    paths.one_line_corpus.write_text(" ".join(corpus.read_text(encoding="utf-8").split()), encoding="utf-8")
    paths.cache = root / "cache"
    return paths


@dataclass
class Outcome:
    code: int
    error: str  # the error line (in-process: the UsageError message, with "error: " as run_cli prints it)
    stderr: str
    before: dict
    after: dict
    case_dir: Path
    stdout: str = ""


def case_folder(tmp_path_factory, case: Case) -> Path:
    return tmp_path_factory.mktemp("case_" + "".join(ch if ch.isalnum() else "_" for ch in case.name))


def run_case_cli(case: Case, inputs: SimpleNamespace, case_dir: Path) -> Outcome:
    if case.prepare:
        case.prepare(inputs, case_dir)
    before = fingerprint(case_dir, inputs.shared)
    env = {"FLUXCHAT_RUNS_DIR": str(case_dir / "runs"), "FLUXCHAT_CACHE": str(inputs.cache), **case.env}
    script = ENTRY_POINTS[case.entry][0]
    result = run_script(PYTHON, script, *case.argv(inputs, case_dir), env=env, timeout=300, input=case.stdin or "")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return Outcome(
        result.returncode, last, result.stderr, before, fingerprint(case_dir, inputs.shared), case_dir, result.stdout
    )


@pytest.fixture(scope="module")
def cli_outcomes(inputs, tmp_path_factory) -> dict[str, Outcome]:
    """Every subprocess case, run a few at a time up front (each mostly waits on imports)."""
    cli_cases = [case for case in CASES if case.cli]
    with ThreadPoolExecutor(PARALLEL_SUBPROCESSES) as pool:
        futures = {
            case.name: pool.submit(run_case_cli, case, inputs, case_folder(tmp_path_factory, case))
            for case in cli_cases
        }
    return {name: future.result() for name, future in futures.items()}


def run_case_in_process(case: Case, inputs: SimpleNamespace, case_dir: Path, monkeypatch) -> Outcome:
    if case.prepare:
        case.prepare(inputs, case_dir)
    monkeypatch.setenv("FLUXCHAT_RUNS_DIR", str(case_dir / "runs"))
    monkeypatch.setenv("FLUXCHAT_CACHE", str(inputs.cache))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(case.stdin))
    before = fingerprint(case_dir, inputs.shared)
    main = importlib.import_module(ENTRY_POINTS[case.entry][1]).main
    code, message = run_main(main, case.argv(inputs, case_dir))
    error = f"error: {message}" if code else ""
    return Outcome(code, error, error, before, fingerprint(case_dir, inputs.shared), case_dir)


def test_table_covers_every_entry_point_through_its_cli():
    assert len({case.name for case in CASES}) == len(CASES)
    assert len([case for case in CASES if case.name not in DEFECTS]) >= 20 and set(DEFECTS) <= {
        case.name for case in CASES
    }
    assert {case.entry for case in CASES if case.cli} == set(ENTRY_POINTS)


def as_param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=DEFECTS[case.name])] if case.name in DEFECTS else []
    return pytest.param(case, id=case.name.replace(" ", "-"), marks=marks)


@pytest.mark.parametrize("case", [as_param(case) for case in CASES])
def test_bad_input(case, inputs, request, tmp_path_factory, monkeypatch):
    if case.cli:
        outcome = request.getfixturevalue("cli_outcomes")[case.name]
    else:
        outcome = run_case_in_process(case, inputs, case_folder(tmp_path_factory, case), monkeypatch)

    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    if case.succeeds:
        assert outcome.code == 0, outcome.stderr[-3000:]
        assert runs.is_finished(case.succeeds(outcome.case_dir)), outcome.stderr[-3000:]
        for note in case.notes:
            assert note in outcome.stdout + outcome.stderr, f"{note!r} not shown; stderr: {outcome.stderr[-3000:]}"
        return
    assert outcome.code == 2, f"exit code {outcome.code}; stderr: {outcome.stderr[-3000:]}"
    assert outcome.error.startswith("error: ") and "\n" not in outcome.error, outcome.stderr[-3000:]
    if case.cli and case.alone:  # nothing else but notes (bf16 on CPUs without it): no library's line above ours
        others = outcome.stderr.strip().splitlines()[:-1]
        assert all(line.startswith("note: ") for line in others), outcome.stderr[-3000:]
    for expected in case.expect:
        assert expected in outcome.error
    changed = {
        path
        for path in outcome.before.keys() | outcome.after.keys()
        if outcome.before.get(path) != outcome.after.get(path)
    }
    assert not changed, f"a failed command wrote: {sorted(changed)[:10]}"


# ---- issue 12, items 6 and 7: the Hub token is never written, and nothing holding it is ever uploaded
HUB_TOKEN = "hf_" + "Q" * 34  # token-shaped, never a real one


def test_hub_token_without_push_is_never_written(tiny_run, tmp_path):
    """--hub_token without --push_to_hub: the Trainer pickles its arguments into training_args.bin of the final
    model and of every checkpoint; not one byte of any file the stage writes may hold the token."""
    from conftest import TINY_MODEL_FLAGS

    from pipeline import pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    out = tmp_path / "out"
    pretrain.main(
        [
            str(a)
            for a in [
                "--preset",
                "tiny",
                "--tokenizer_name_or_path",
                tiny_run / "tokenizer",
                "--train_file",
                corpus,
                "--output_dir",
                out,
                "--max_steps",
                2,
                "--save_steps",
                1,
                "--eval_strategy",
                "no",
                "--hub_token",
                HUB_TOKEN,
                *TINY_MODEL_FLAGS,
            ]
        ]
    )
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in files), "the pickle this test is about was written"
    assert [path for path in files if HUB_TOKEN.encode() in path.read_bytes()] == []


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "extra_state.pt", "weights.pth", "model.safetensors", "README.md"]
)
def test_push_scans_every_file_binary_or_not(tmp_path, monkeypatch, name):
    """Every file that would be uploaded is scanned, in chunks: here the token straddles a chunk boundary."""
    from fluxchat import hub
    from fluxchat.cli import UsageError

    monkeypatch.setattr(hub, "SCAN_CHUNK_BYTES", 1000)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_bytes(bytes(range(256)) * 3 + b"\x00" * 220 + HUB_TOKEN.encode() + bytes(range(256)) * 12)
    with pytest.raises(UsageError, match=f"{name} contains your Hub token"):
        hub.refuse_leaked_token(tmp_path, HUB_TOKEN)
    (tmp_path / name).write_bytes(bytes(range(256)) * 16)
    hub.refuse_leaked_token(tmp_path, HUB_TOKEN)  # the same folder without the token passes
