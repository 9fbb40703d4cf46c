"""Evaluate a model on the held-out built-in tasks, a reward model on held-out preference pairs, and
the mean reward of a policy's replies, with `fluxchat/evaluation.py`'s functions, which every stage also calls at its end.

    python pipeline/evaluate.py runs/demo                        # most aligned finished stage: ppo > grpo > dpo > sft > pretrain
    python pipeline/evaluate.py runs/demo/sft --n_per_task 20 --output_file sft_eval.json
    python pipeline/evaluate.py runs/demo/ppo --reward_model runs/demo/reward
    python pipeline/evaluate.py runs/demo/sft --reward_model runs/demo/reward \
        --pairs_file ../shared/data/pref/hh-rlhf_helpful-base_test.jsonl.gz --max_pairs 500
    python pipeline/evaluate.py runs/demo --report               # every stage of the run: report.json, report.md
    python pipeline/evaluate.py runs/demo/sft --split train --seed 999   # validation: compare recipes off the test items

Task accuracy is exact match (whitespace normalised) of the greedy reply, stopped at the end-of-turn
token, with the expected answer. Writes JSON (default: evaluation.json in the model folder).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxchat import cards, evaluation, formats, loading, runs, stage_data, tasks
from fluxchat import report as stage_reports
from fluxchat.config import UsageError, fail, parse_config, run_cli

SPLITS = ("eval", "train")
# Its own default file for the train split: a validation run never replaces the test figures.
OUTPUT_FILES = {"eval": runs.EVALUATION_FILE, "train": "evaluation-train.json"}
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


def _examples(args) -> list[dict]:
    chosen = tasks.select_tasks(args.tasks)
    corpus_tasks = [t for t in chosen if t in tasks.CORPUS_TASKS]
    if corpus_tasks and args.corpus_file is None:
        try:
            tasks.resolve_corpus(None)
        except UsageError:
            print(
                f"note: skipping {', '.join(corpus_tasks)}: tinyshakespeare is neither shipped (data/) nor cached nor downloadable; pass --corpus_file PATH to include them",
                file=sys.stderr,
            )
            chosen = tuple(t for t in chosen if t not in tasks.CORPUS_TASKS)
            if not chosen:
                fail("no task left to evaluate: pass --corpus_file for the quote/speaker tasks")
    return tasks.conversations(
        args.split, n=args.n_per_task * len(chosen), seed=args.seed, corpus_file=args.corpus_file, tasks=chosen
    )


def _pairs_from_files(args, reward_path: str | None) -> dict[str, list[dict]]:
    """Each --pairs_file's pairs to score. Of a file the reward stage trained on, only those it held out, split
    again as it split them: a third of a --pairs_heldout_fraction split of the file alone had been trained on."""
    out = {}
    for source in args.pairs_file or []:
        heldout = stage_data.stage_heldout_pairs(Path(reward_path), source) if reward_path else None
        if heldout is not None:
            print(
                f"note: {source}: scoring the {len(heldout)} pairs {reward_path} held out (it trained on the others)",
                file=sys.stderr,
            )
            if not heldout:
                fail(f"--pairs_file {source}: {reward_path} held none of its pairs out; score a file it never read")
            out[source] = heldout[: args.max_pairs]
            continue
        rows, dropped = formats.load_preferences([source], corpus_file=args.corpus_file)
        if dropped:
            print(f"note: {source}: dropped {dropped} pairs with chosen == rejected", file=sys.stderr)
        if args.pairs_heldout_fraction is not None:
            rows = formats.split_heldout(rows, args.pairs_heldout_fraction, args.seed)[1]
        out[source] = rows[: args.max_pairs]
    return out


def _identity(folder) -> tuple[int, int] | None:
    """The folder as the file system knows it: a stage replaced by --overwrite is another folder renamed over it."""
    try:
        stat = os.stat(folder)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def main(argv: list[str] | None = None) -> Path:
    args, _config_file = parse_config("evaluate", (EvaluateArguments,), argv, positional="model")
    if args.report:
        return stage_report(args)
    if args.pairs_file and not args.reward_model:
        fail("--pairs_file needs --reward_model (the pairs are scored by a reward model)")
    model_path = loading.resolve_model(args.model)
    reward_path = loading.resolve_model(args.reward_model, "reward_model") if args.reward_model else None
    examples = _examples(args)
    file_pairs = _pairs_from_files(args, reward_path)
    if args.output_file:
        output_file = Path(args.output_file)
    elif Path(model_path).is_dir():
        output_file = Path(model_path) / OUTPUT_FILES[args.split]
    else:
        output_file = Path(OUTPUT_FILES[args.split])
    # Checked before the work: a folder (or a path under a file) would fail only after the whole evaluation ran.
    if output_file.is_dir():
        fail(f"--output_file {output_file} is a folder: name a file, e.g. {output_file / 'evaluation.json'}")
    if output_file.exists() and not output_file.is_file():  # the report is renamed into place: /dev/null would go
        fail(f"--output_file {output_file} is not a regular file (a device, FIFO or socket): name a file")
    if blocking := next((p for p in output_file.parents if p.exists() and not p.is_dir()), None):
        fail(f"--output_file {output_file}: {blocking} is a file, so nothing can be written under it")
    runs.check_writable(output_file.parent, f"--output_file {output_file}")
    refuse_other_files(output_file)
    loading.refuse_replies_past_the_context(
        args.max_new_tokens, loading.context_length(loading.load_config(model_path))
    )

    evaluated = _identity(model_path)
    tokenizer = loading.load_tokenizer(model_path)
    if reward_path:  # before the evaluation: its scores of another tokenizer's ids would be noise
        loading.check_same_tokenizer(tokenizer, reward_path, "--reward_model", against=model_path)
    model = loading.load_model(model_path, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    start = time.perf_counter()
    report = {
        "model": model_path,
        "split": args.split,
        "tasks": evaluation.evaluate_tasks(model, tokenizer, examples, args.max_new_tokens, args.batch_size),
    }
    if reward_path:
        reward_model = loading.load_model(reward_path, tokenizer, reward=True).to(device)
        report["reward_model"] = reward_path
        report["reward_pairs"] = {"builtin": _score_builtin_pairs(args, reward_model, tokenizer, examples)}
        for source, pairs in file_pairs.items():
            report["reward_pairs"][source] = evaluation.evaluate_reward_model(
                reward_model, tokenizer, pairs, args.batch_size
            )
        report["mean_reward"] = evaluation.mean_reward(
            model, reward_model, tokenizer, examples, args.max_new_tokens, args.batch_size
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    try:
        print(format_report(report), flush=True)  # first: a file that cannot be written keeps the figures on screen
    except OSError as err:  # and a screen that cannot show them (`| head`, a full disk) keeps the file
        unshown: OSError | None = err
    else:
        unshown = None
    if output_file.parent.resolve() == Path(model_path).resolve() and _identity(model_path) != evaluated:
        # `--overwrite` swapped a new stage in while this ran: these figures are the old model's, not its
        fail(
            f"{model_path} was replaced while this evaluation ran (--overwrite): its figures describe the model "
            f"that was there before, so {output_file.name} was not written; evaluate it again"
        )
    try:
        runs.write_json(output_file, report)
    except OSError as err:  # what check_writable cannot foresee: a read-only or virtual file system, a full disk
        fail(f"--output_file {output_file}: cannot write it ({err.strerror or err})")
    if isinstance(unshown, BrokenPipeError):
        raise unshown  # the reader left: run_cli ends quietly, as a Unix tool does
    if unshown is not None:
        fail(f"the report could not be printed ({unshown.strerror or unshown}); it is saved in {output_file}")
    print(f"wrote {output_file}")
    return output_file


def refuse_other_files(output_file: Path) -> None:
    """An evaluation replaces its own earlier report, never a file of the user's (a --pairs_file, notes, a config)."""
    if not output_file.is_file():
        return
    try:
        earlier = json.loads(output_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and {"model", "tasks"} <= earlier.keys()):
        fail(
            f"--output_file {output_file} exists and is not an evaluation report: name a new file (only an earlier "
            "report is replaced)"
        )


def _score_builtin_pairs(args, reward_model, tokenizer, examples: list[dict]) -> dict:
    """The reward model on built-in preference pairs of the evaluated split and tasks, as many as examples."""
    pairs = tasks.preference_pairs(
        args.split,
        n=len(examples),
        seed=args.seed,
        corpus_file=args.corpus_file,
        tasks=tuple(task for task in tasks.TASKS if any(example["task"] == task for example in examples)),
    )
    return evaluation.evaluate_reward_model(reward_model, tokenizer, pairs, args.batch_size)


def stage_report(args) -> Path:
    """--report: score every finished chat stage of a run on the same held-out items (fluxchat/report.py)."""
    run = Path(args.model)
    if args.output_file or args.pairs_file:
        fail(
            "--report writes report.json and report.md into the run folder and scores no pairs: drop --output_file/--pairs_file"
        )
    if args.split != "eval":
        fail("--report compares the stages on the held-out items: drop --split train")
    if not run.is_dir() or runs.holds_model(run):
        fail(f"--report: {run} is not a run folder (give runs/<name>, whose stages are compared)")
    stages = stage_reports.report_stages(run)
    if not stages:
        fail(f"--report: {run} has no finished {'/'.join(stage_reports.REPORT_STAGES)} stage")
    if args.reward_model:
        reward_path = loading.resolve_model(args.reward_model, "reward_model")
    else:
        reward_path = str(run / "reward") if runs.is_finished(run / "reward") else None
    for stage in stages if reward_path else ():  # before any stage is scored: another tokenizer's ids are noise
        stage_tokenizer = loading.load_tokenizer(str(run / stage))
        loading.check_same_tokenizer(stage_tokenizer, reward_path, "--reward_model", against=str(run / stage))
    examples = _examples(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    reward_model = None
    results = {}
    for stage in stages:
        context = loading.context_length(loading.load_config(str(run / stage)))
        loading.refuse_replies_past_the_context(args.max_new_tokens, context)
        tokenizer = loading.load_tokenizer(str(run / stage))
        model = loading.load_model(str(run / stage), tokenizer).to(device)
        if reward_path and reward_model is None:
            reward_model = loading.load_model(reward_path, tokenizer, reward=True).to(device)
        results[stage] = stage_reports.score_stage(
            model, tokenizer, examples, reward_model, args.max_new_tokens, args.batch_size
        )
        print(f"{stage}: overall {results[stage]['overall']:.3f} on {results[stage]['n']} examples", flush=True)
        del model
    data = stage_reports.build_report(run, results, args.n_per_task, args.seed, reward_path)
    if reward_model is not None:  # what its mean-reward row can be trusted to tell: content or only form
        data["reward_pairs"] = _score_builtin_pairs(args, reward_model, tokenizer, examples)
    data["seconds"] = round(time.perf_counter() - start, 1)
    runs.write_json(run / stage_reports.REPORT_JSON, data)
    markdown = stage_reports.to_markdown(data)
    runs.atomic_write_text(run / stage_reports.REPORT_MD, markdown)
    final = run / data["final_stage"]
    cards.write_model_card(final, cards.stage_of(final))  # the final stage's card shows the report
    print(
        f"\nstage report of {run}\n{markdown}wrote {run / stage_reports.REPORT_JSON}, {run / stage_reports.REPORT_MD} and {final / 'README.md'}"
    )
    return run / stage_reports.REPORT_JSON


def format_report(report: dict) -> str:
    """A small table for the terminal."""
    result = report["tasks"]
    lines = [f"model {report['model']}", f"{'task':<12} {'accuracy':>8} {'n':>5}"]
    for task, accuracy in result["per_task"].items():
        lines.append(f"{task:<12} {accuracy:>8.3f} {result['n_per_task'][task]:>5}")
    lines.append(
        f"{'overall':<12} {result['overall']:>8.3f} {result['n']:>5}   (mean over tasks; replies ending at <|end|>: {result['eos_rate']:.0%})"
    )
    for source, scored in report.get("reward_pairs", {}).items():
        lines.append(
            f"reward accuracy {scored['accuracy']:.3f}, margin {scored['margin']:.3f} on {scored['n']} pairs ({source})"
        )
        if scored.get("per_flaw"):
            lines.append(f"  by flaw of the rejected reply: {stage_reports.describe_flaws(scored)}")
    if "mean_reward" in report:
        lines.append(
            f"mean reward of the model's replies {report['mean_reward']['mean_reward']:.3f} (n {report['mean_reward']['n']})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
