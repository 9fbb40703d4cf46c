"""The chain run_all.py runs, and the only module that knows it: the stages' order, the texts it writes for them,
each stage's command line, when a stage counts as done (skipped), and the per-stage summary (runs/<name>/summary.json).
How a stage's process is started and stopped is launch.py's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fluxchat import data, launch, runs, tasks
from fluxchat import report as stage_reports
from fluxchat.cli import UsageError, fail
from fluxchat.config import command_path

SCRIPTS = runs.SCRIPTS  # stage -> its script, in chain order
TEXT_READERS = ("tokenizer", "pretrain", "sft")  # the stages that read the generated texts in runs/<name>/data/
REPORT = "report"  # after evaluate: every chat stage on the same held-out items (pipeline/evaluate.py --report)
CHAIN = (*SCRIPTS, "evaluate", REPORT)  # every step run_all can run, in order
RUN_LEVEL = ("evaluate", REPORT)  # steps that write into the run folder itself, not a stage folder
CORPORA = ("tinyshakespeare", "embedded")
MIX_SETTING = {"sft": "mix_text_fraction", "dpo": "mix_text_weight"}  # how much of it each mixes in
OFFLINE_TASKS = ("arithmetic", "copy", "upper", "capital", "followup")
OWNED_FLAGS = ("run_name", "output_dir", "output_file")  # where a stage writes: the chain decides


def chain_order(stages: list[str]) -> list[str]:
    """`stages` in chain order, once each; an unknown stage is an error, a reordering a note (`--stages sft
    pretrain`: SFT would fail for want of the model pretrain makes)."""
    unknown = [s for s in stages if s not in CHAIN]
    if unknown:
        fail(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(CHAIN)}")
    ordered = [stage for stage in CHAIN if stage in stages]
    if ordered != stages:
        print(f"note: --stages run in chain order, once each: {' '.join(ordered)}", flush=True)
    return ordered


def split_stage_args(items: list[str]) -> dict[str, list[str]]:
    """`['sft:--max_steps=5', 'sft:--overwrite']` -> {'sft': ['--max_steps=5', '--overwrite']}; the flags that move
    a stage's output are refused (the next stage would not find its input, the summary would name the wrong folder)."""
    extra: dict[str, list[str]] = {}
    for item in items:
        stage, _, flag = item.partition(":")
        if stage not in CHAIN or not flag.startswith("--"):
            fail(f"--stage_args {item!r}: expected 'stage:--flag=value' with a stage from {', '.join(CHAIN)}")
        name, space, value = flag.partition(" ")
        if space and "=" not in name:  # `"sft:--max_steps 5"`: the stage read "--max_steps 5" as one unknown flag
            fail(f"--stage_args {item!r}: join a flag to its value with '=': {stage}:{name}={value.strip()}")
        extra.setdefault(stage, []).append(flag)
    for stage, flags in extra.items():
        if owned := [f for f in flags if f.split("=")[0].lstrip("-").replace("-", "_") in OWNED_FLAGS]:
            fail(f"--stage_args {stage}:{owned[0]}: the chain sets where its stages write; give run_all --run_name")
        if "--help" in flags:  # it printed the stage's help as run_all's, and exited 0
            path = "pipeline/evaluate.py" if stage in RUN_LEVEL else SCRIPTS[stage]
            fail(f"--stage_args {stage}:--help: a stage's flags are listed by `python {command_path(path)} --help`")
    return extra


def redo(stage_flags: list[str]) -> bool:
    """`--stage_args sft:--overwrite`: the user asks for the stage again, finished or not."""
    return any(flag in ("--overwrite", "--overwrite=true", "--overwrite=True") for flag in stage_flags)


def note_unapplied_stage_args(run_name: str, stages: list[str], extra: dict[str, list[str]]) -> None:
    """--stage_args for a stage this command does not run say so, not silently nothing."""
    for stage, flags in extra.items():
        shown = " ".join(flags)
        if stage not in stages:
            print(f"note: --stage_args {stage}:{shown} not applied: {stage} is not in --stages", flush=True)
        elif stage in SCRIPTS and runs.is_finished(runs.stage_dir(run_name, stage)) and not redo(flags):
            print(
                f"note: --stage_args {stage}:{shown} not applied: {stage} is finished and is skipped; add "
                f"{stage}:--overwrite to train it again with them",
                flush=True,
            )


# ---- the texts the chain writes for its stages (runs/<name>/data/)


def prepare_corpus(
    data_dir: Path, train_file: list[str] | None, corpus: str, with_facts: bool, write: bool = True
) -> tuple[list[str], list[str]]:
    """(pretraining files, extra flags for the alignment stages). The generated texts are written to `data_dir`
    only if `write` (a stage that reads them is asked for): `--stages ppo` on a run without SFT leaves no trace."""
    task_flags: list[str] = []
    if corpus not in CORPORA:
        fail(f"--corpus {corpus}: choose from {', '.join(CORPORA)}")
    if train_file and corpus != CORPORA[0]:
        fail(f"--corpus {corpus} and --train_file both name the pretraining text: give one")
    if corpus == "embedded":
        return embedded_corpus(data_dir, write)
    if train_file:
        files = [str(f) for f in data.expand_files(train_file)]  # check them before any stage runs
        text_files = [f for f in files if f.endswith(".txt")]
        task_flags = corpus_task_flags(text_files[0] if text_files else None)
    else:
        try:
            default = data.default_corpus()
            files = [str(default)]
            task_flags = ["--corpus_file", str(default)]
        except UsageError as err:  # a copy of the package without data/, offline
            print(f"note: {err}; pretraining on the embedded task corpus instead", flush=True)
            return embedded_corpus(data_dir, write)
    if with_facts:
        path = data_dir / runs.FACTS_FILE
        if write and not path.is_file():
            runs.atomic_write_text(path, tasks.facts_corpus())
        if write and not (data_dir / runs.FACTS_MIX_FILE).is_file():
            runs.atomic_write_text(data_dir / runs.FACTS_MIX_FILE, tasks.facts_corpus(table_repeats=0))
        files.append(str(path))
    return files, task_flags


def embedded_corpus(data_dir: Path, write: bool = True) -> tuple[list[str], list[str]]:
    path = data_dir / "embedded_corpus.txt"
    if write and not path.is_file():
        runs.atomic_write_text(path, tasks.embedded_corpus())
    print(f"note: pretraining on the embedded task corpus ({path}); the quote/speaker tasks are left out", flush=True)
    return [str(path)], ["--tasks", *OFFLINE_TASKS]


def corpus_task_flags(text_file: str | None) -> list[str]:
    """Flags for the quote/speaker tasks, which draw lines from a play script (`NAME:` blocks): the user's corpus
    if it is one, else the shipped tinyshakespeare (None below), else the tasks are left out; a note says which."""
    for corpus in ([text_file] if text_file else []) + [None]:
        try:
            tasks.conversations("eval", n=len(tasks.CORPUS_TASKS), corpus_file=corpus, tasks=tasks.CORPUS_TASKS)
        except UsageError as err:
            print(f"note: the quote/speaker tasks cannot use {corpus or 'tinyshakespeare'}: {err}", flush=True)
            continue
        if corpus != text_file:
            print(
                "note: the quote/speaker tasks draw their lines from tinyshakespeare (your corpus is not a play script)",
                flush=True,
            )
        return ["--corpus_file", tasks.resolve_corpus(corpus)]
    print(
        f"note: the quote/speaker tasks are left out: the stages train and evaluate on {', '.join(OFFLINE_TASKS)}",
        flush=True,
    )
    return ["--tasks", *OFFLINE_TASKS]


# ---- each stage's command line


def stage_command(
    stage: str,
    run_name: str,
    preset: str,
    accelerate_config: str | None,
    corpus_files: list[str],
    task_flags: list[str],
    extra: list[str],
    with_facts: bool,
) -> list[str]:
    run = runs.run_dir(run_name)
    if stage == "evaluate":
        policy = runs.latest_stage(run) or run / "ppo"
        cmd = [sys.executable, command_path("pipeline/evaluate.py"), str(policy)]
        cmd += ["--output_file", str(run / runs.EVALUATION_FILE)]
        if runs.is_finished(run / "reward"):
            cmd += ["--reward_model", str(run / "reward")]
        return cmd + task_flags + extra
    if stage == REPORT:
        return [sys.executable, command_path("pipeline/evaluate.py"), str(run), "--report"] + task_flags + extra
    cmd = launch.launcher(stage, accelerate_config)
    cmd += [command_path(SCRIPTS[stage]), "--preset", preset, "--run_name", run_name]
    if stage in ("tokenizer", "pretrain"):
        cmd += ["--train_file", *corpus_files]
    else:
        cmd += task_flags
    mix = run / runs.DATA_DIR / runs.FACTS_MIX_FILE
    if stage in MIX_SETTING and with_facts and mix.is_file():
        # Mixed training: the facts prose beside the chat rows keeps SFT (and DPO, as a language-modelling term in
        # its loss) from overwriting what pretraining stored.
        # Not the sums' steps table: in SFT's windows it took capital transfer (validation countries 34% -> 24%)
        # and gave the sums nothing (64% -> 60% of validation sums); pretraining alone stores it.
        cmd += ["--mix_text_file", str(mix)]
    elif stage in MIX_SETTING and not any(flag.split("=")[0] == "--mix_text_file" for flag in extra):
        # No facts prose (--with_facts false, --corpus embedded) and no file of the user's: the recipe's mix is off,
        # said on the command line rather than in the stage's note that a mix without its file does nothing.
        cmd += [f"--{MIX_SETTING[stage]}", "0"]
    folder = runs.stage_dir(run_name, stage)
    if folder.exists() and not runs.is_finished(folder) and not redo(extra):  # interrupted earlier
        cmd += ["--resume"] if stage in runs.RESUMABLE and runs.latest_checkpoint(folder) else ["--overwrite"]
    return cmd + extra


# ---- when a step is done, and skipped


def output_folder(run_name: str, stage: str) -> Path:
    return runs.run_dir(run_name) if stage in RUN_LEVEL else runs.stage_dir(run_name, stage)


def is_done(run_name: str, stage: str, flags: list[str], trained_now: list[str]) -> bool:
    """Whether `stage` has nothing to do: a finished stage not asked to be redone; an evaluation or report newer than
    every stage, made with the same flags, when this command trained nothing (else it describes other models)."""
    run = runs.run_dir(run_name)
    same_flags = ran_with(run, stage) == flags  # other evaluate/report flags: made again
    if stage == "evaluate":
        evaluation = run / runs.EVALUATION_FILE
        return evaluation.is_file() and newer_than_every_stage(evaluation, run) and not trained_now and same_flags
    if stage == REPORT:
        return report_is_current(run) and not trained_now and same_flags
    return runs.is_finished(runs.stage_dir(run_name, stage)) and not redo(flags)


def note_stale_later_stages(run_name: str, stage: str, extra: dict[str, list[str]]) -> None:
    later = list(SCRIPTS)[list(SCRIPTS).index(stage) + 1 :]
    kept = [s for s in later if runs.is_finished(runs.stage_dir(run_name, s)) and not redo(extra.get(s, []))]
    if kept:
        print(
            f"note: {stage} is redone (--overwrite); {', '.join(kept)} came after it, perhaps from it, and stay as they "
            f"are unless redone too (--stage_args {kept[0]}:--overwrite ...)",
            flush=True,
        )


def report_is_current(run: Path) -> bool:
    """report.json exists, covers exactly the chat stages finished now (a stage added later re-runs it) and is newer
    than every one of them (a stage redone by its own command re-runs it too)."""
    try:
        report = json.loads((run / stage_reports.REPORT_JSON).read_text())
    except (OSError, ValueError):
        return False
    current = isinstance(report, dict) and report.get("stages") == stage_reports.report_stages(run)
    return current and newer_than_every_stage(run / stage_reports.REPORT_JSON, run)


def newer_than_every_stage(path: Path, run: Path) -> bool:
    """`path` was written after every finished stage of the run: an evaluation or report from before a stage was
    redone (`sft.py --overwrite` by hand) describes a model that is no longer there."""
    finished = [runs.stage_dir(run.name, s) / runs.FINISHED_MARKER for s in SCRIPTS]
    try:
        written = path.stat().st_mtime
        return all(written >= marker.stat().st_mtime for marker in finished if marker.is_file())
    except OSError:
        return False


# ---- the summary: one row per step (summary.json and the table run_all prints)


def _summary_rows(run: Path) -> list[dict]:
    try:
        rows = json.loads((run / runs.SUMMARY_FILE).read_text()).get("stages") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [row for row in rows if isinstance(row, dict) and "stage" in row] if isinstance(rows, list) else []


def ran_with(run: Path, stage: str) -> list[str]:
    """The --stage_args the run's last evaluate or report ran with (as summary.json records them)."""
    rows = [row for row in _summary_rows(run) if row["stage"] == stage and row.get("status") == "ran"]
    return list(rows[-1].get("flags") or []) if rows else []


def write_summary(run: Path, preset: str, rows: list[dict]) -> None:
    """This command's rows, and the earlier rows of stages it did not run (`--stages report`, or a rerun that
    skips finished stages, kept no trace of the chain's timings), in chain order."""
    by_stage = {row["stage"]: row for row in _summary_rows(run)}
    by_stage.update({row["stage"]: row for row in rows if row["status"] == "ran" or row["stage"] not in by_stage})
    order = list(CHAIN)
    merged = sorted(
        by_stage.values(), key=lambda row: order.index(row["stage"]) if row["stage"] in order else len(order)
    )
    runs.write_json(run / runs.SUMMARY_FILE, {"preset": preset, "stages": merged})


def summary_table(rows: list[dict]) -> str:
    lines = [f"{'stage':<10} {'status':<8} {'wall':>8}  key metric"]
    for row in rows:
        wall = f"{row['seconds']:.0f}s" if row["seconds"] is not None else "-"
        lines.append(f"{row['stage']:<10} {row['status']:<8} {wall:>8}  {row['metric']}")
    total = sum(row["seconds"] or 0 for row in rows)
    return "\n".join([*lines, f"{'total':<10} {'':<8} {total:>7.0f}s"])


KEY_METRICS = {  # stage -> (label, key in its metrics file), the first found shown
    "tokenizer": [("bytes/token", "bytes_per_token")],
    "pretrain": [("val bits/byte", "eval_bits_per_byte")],
    "sft": [("task accuracy", "task_accuracy"), ("task accuracy", "eval_task_accuracy")],
    "reward": [("pair accuracy", "reward_accuracy"), ("pair accuracy", "eval_accuracy")],
    "ppo": [("mean reward", "mean_reward"), ("task accuracy", "task_accuracy")],
    "evaluate": [("task accuracy", "overall")],
    "grpo": [("task accuracy", "task_accuracy"), ("mean reward", "mean_reward")],
    "dpo": [("task accuracy", "task_accuracy"), ("pair accuracy", "eval_rewards/accuracies")],
}


def key_metric(run_name: str, stage: str) -> str:
    folder = output_folder(run_name, stage)
    path = folder / {
        "tokenizer": runs.TOKENIZER_STATS_FILE,
        "evaluate": runs.EVALUATION_FILE,
        REPORT: stage_reports.REPORT_JSON,
    }.get(stage, runs.METRICS_FILE)
    if not path.is_file():
        return ""
    m = json.loads(path.read_text())
    if stage == REPORT:
        results = m.get("results", {})  # in chain order: the JSON's keys come back sorted
        return ", ".join(f"{s} {100 * results[s]['overall']:.1f}%" for s in m.get("stages", []) if s in results)
    flat = _flatten(m)
    picks = KEY_METRICS.get(stage, [])
    found = [f"{label} {flat[key]:.3f}" for label, key in picks if isinstance(flat.get(key), (int, float))]
    return ", ".join(dict.fromkeys(found))


def _flatten(d: dict) -> dict:
    """Top-level keys, then keys of nested dicts where the top level has none (the summary reads either)."""
    out = {k: v for k, v in d.items() if not isinstance(v, dict)}
    for v in d.values():
        if isinstance(v, dict):
            for k, inner in _flatten(v).items():
                out.setdefault(k, inner)
    return out
