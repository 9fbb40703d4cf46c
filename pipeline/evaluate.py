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

import time
from pathlib import Path

import torch

from fluxchat import cards, evaluation, loading, runs, stage_data
from fluxchat import report as stage_reports
from fluxchat.arguments import EvaluateArguments
from fluxchat.cli import fail, run_cli
from fluxchat.config import parse_config

# Its own default file for the train split: a validation run never replaces the test figures.
OUTPUT_FILES = {"eval": runs.EVALUATION_FILE, "train": "evaluation-train.json"}


def main(argv: list[str] | None = None) -> Path:
    args, _config_file = parse_config("evaluate", (EvaluateArguments,), argv, positional="model")
    if args.report:
        return write_stage_report(args)
    if args.pairs_file and not args.reward_model:
        fail("--pairs_file needs --reward_model (the pairs are scored by a reward model)")
    model_path = loading.resolve_model(args.model)
    reward_path = loading.resolve_model(args.reward_model, "reward_model") if args.reward_model else None
    examples = stage_data.evaluation_examples(args.split, args.n_per_task, args.seed, args.corpus_file, args.tasks)
    file_pairs = stage_data.pairs_to_score(
        args.pairs_file or [], reward_path, args.corpus_file, args.pairs_heldout_fraction, args.seed, args.max_pairs
    )
    if args.output_file:
        output_file = Path(args.output_file)
    else:
        output_file = (Path(model_path) if Path(model_path).is_dir() else Path()) / OUTPUT_FILES[args.split]
    runs.check_evaluation_file(output_file)
    loading.refuse_replies_past_the_context(
        args.max_new_tokens, loading.context_length(loading.load_config(model_path))
    )

    evaluated = runs.folder_identity(model_path)
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
        builtin = evaluation.score_builtin_pairs(
            reward_model, tokenizer, examples, args.split, args.seed, args.corpus_file, args.batch_size
        )
        # The train split's pairs under their own name: read beside held-out figures, "builtin" would pass for them.
        report["reward_pairs"] = {"builtin" if args.split == "eval" else "builtin-train": builtin}
        for source, pairs in file_pairs.items():
            report["reward_pairs"][source] = evaluation.evaluate_reward_model(
                reward_model, tokenizer, pairs, args.batch_size
            )
        report["mean_reward"] = evaluation.mean_reward(
            model, reward_model, tokenizer, examples, args.max_new_tokens, args.batch_size
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    try:
        print(stage_reports.format_evaluation(report), flush=True)  # first: an unwritable file keeps them on screen
    except OSError as err:  # and a screen that cannot show them (`| head`, a full disk) keeps the file
        unshown: OSError | None = err
    else:
        unshown = None
    if output_file.parent.resolve() == Path(model_path).resolve() and runs.folder_identity(model_path) != evaluated:
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


def write_stage_report(args) -> Path:
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
    examples = stage_data.evaluation_examples("eval", args.n_per_task, args.seed, args.corpus_file, args.tasks)
    start = time.perf_counter()
    data = stage_reports.score_run(
        run,
        stages,
        examples,
        reward_path,
        args.max_new_tokens,
        args.batch_size,
        args.n_per_task,
        args.seed,
        args.corpus_file,
    )
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


if __name__ == "__main__":
    run_cli(main)
