"""One command from raw text to a chat model: tokenizer -> pretrain -> SFT -> reward -> PPO -> GRPO -> DPO
-> evaluation -> stage report.

    python pipeline/run_all.py --preset tiny --run_name demo
    python pipeline/run_all.py --preset tiny --run_name demo --train_file my_corpus.txt
    python pipeline/run_all.py --preset small --run_name big --accelerate_config configs/accelerate/single_gpu.yaml

Each stage runs through the same entry point a user would type (`accelerate launch pipeline/<stage>.py
--preset P --run_name R`, by way of fluxchat/launch.py, which only keeps Ctrl-C from ending the launcher before
the stage), so accelerate settings apply. Stages that already finished are skipped; an interrupted pretrain, SFT,
GRPO or DPO continues from its newest checkpoint; so re-running the same command after a crash or Ctrl-C picks up
where it stopped. PPO, GRPO and DPO each start from the SFT model, in their own
folders. Ends with a per-stage summary (runs/R/summary.json) and the stage report: every chat stage on the
same held-out items (runs/R/report.md, also in the final stage's model card).

Data: with no --train_file the chain pretrains on tinyshakespeare as shipped in data/ (no network needed).
The built-in fact tasks (capitals, populations) can only be recalled, so the chain adds a facts text
rendered by our task generators (`--with_facts false` to skip): every fact in several sentence forms, mixed
with question-answer dialogues about the training countries only, and the single-digit steps of worked sums
(never a whole sum); SFT mixes in the same text without those steps. `--corpus embedded` pretrains on the
generated task corpus instead (no Shakespeare, so the quote/speaker tasks are left out).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fluxchat import data, runs, tasks
from fluxchat import report as stage_reports
from fluxchat.config import (
    REPO_ROOT,
    Interrupted,
    UsageError,
    command_path,
    fail,
    load_yaml,
    on_cpu_only,
    parse_config,
    pop_flag,
    presets,
    run_cli,
)

SCRIPTS = runs.SCRIPTS  # stage -> its script, in chain order
TEXT_READERS = ("tokenizer", "pretrain", "sft")  # the stages that read the generated texts in runs/<name>/data/
REPORT = "report"  # after evaluate: every chat stage on the same held-out items (pipeline/evaluate.py --report)
CHAIN = (*SCRIPTS, "evaluate", REPORT)  # every step this command can run, in order
CORPORA = ("tinyshakespeare", "embedded")
FACTS_FILE = "facts.txt"  # pretraining: the facts text, steps table included
SFT_MIX_FILE = "facts_mix.txt"  # SFT's mixed windows: the same facts prose and dialogues, no steps table
OFFLINE_TASKS = ("arithmetic", "copy", "upper", "capital", "followup")


@dataclass
class RunAllArguments:
    run_name: str = field(default="demo", metadata={"help": "Everything goes to runs/<run_name>/."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Pretraining text files/folders; default the shipped tinyshakespeare (data/)."}
    )
    corpus: str = field(
        default="tinyshakespeare",
        metadata={
            "help": "With no --train_file: 'tinyshakespeare' (shipped in data/) or 'embedded' (the generated task corpus, no quote/speaker tasks)."
        },
    )
    with_facts: bool = field(
        default=True,
        metadata={"help": "Add the built-in facts text to pretraining, so the fact tasks can be learned."},
    )
    stages: list[str] = field(
        default_factory=lambda: list(CHAIN),
        metadata={"help": "Stages to run (always in chain order: each reads what the one before it made)."},
    )
    accelerate_config: str | None = field(
        default=None, metadata={"help": "accelerate config for the training stages (see configs/accelerate/)."}
    )
    stage_args: list[str] | None = field(
        default=None, metadata={"help": "Extra flags as 'stage:--flag=value' (e.g. pretrain:--max_steps=100)."}
    )


def launcher(args: RunAllArguments, stage: str) -> list[str]:
    if stage == "tokenizer":
        return [sys.executable]
    # --quiet: a failing stage's own one-line error is the last word, not accelerate's CalledProcessError traceback.
    cmd = [sys.executable, "-m", "fluxchat.launch", "--quiet"]  # accelerate launch, quiet on Ctrl-C too
    if args.accelerate_config:
        return cmd + ["--config_file", args.accelerate_config]
    # Explicit defaults: no accelerate config on this machine is normal, and silences accelerate's warning.
    cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if on_cpu_only():  # accelerate otherwise sets OMP_NUM_THREADS=1: one core of the machine, half the speed on 2
        cmd += ["--num_cpu_threads_per_process", str(os.cpu_count() or 1)]
    return cmd


def check_accelerate_config(path: str) -> None:
    """accelerate reads its config only when it launches the first training stage, and a wrong one ends there in
    a traceback, after the tokenizer ran: read it as accelerate does, before any stage."""
    from accelerate.commands.config.config_args import load_config_from_file  # only with the flag: 2 s of imports

    if not Path(path).is_file():
        fail(f"--accelerate_config {path}: no such file (configs/accelerate/ has one per setup)")
    if not load_yaml(Path(path)):  # one line for a file that is not a YAML (or JSON) mapping
        fail(f"--accelerate_config {path} is empty: accelerate needs at least its distributed_type")
    try:
        config = load_config_from_file(path)
    except (ValueError, TypeError, KeyError) as err:  # no or an unknown distributed_type, unknown keys
        fail(f"--accelerate_config {path}: {str(err).strip().splitlines()[0]}")
    # accelerate takes any YAML value here and fails on it only when it launches (`num_processes: abc`: a TypeError
    # comparing it with 1, after the tokenizer stage ran).
    for key in ("num_processes", "num_machines", "machine_rank", "main_process_port"):
        value = getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            fail(f"--accelerate_config {path}: {key} must be a whole number, got {value!r}")
    precision = str(getattr(config, "mixed_precision", None) or "no")
    if precision not in ("no", "fp16", "bf16", "fp8"):
        fail(f"--accelerate_config {path}: mixed_precision must be no, fp16, bf16 or fp8, got {precision!r}")
    kind = str(getattr(getattr(config, "distributed_type", None), "value", getattr(config, "distributed_type", "")))
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:  # else an ImportError traceback at
        fail(  # the first training stage, after the tokenizer ran
            f"--accelerate_config {path} runs DeepSpeed, which is not installed: `pip install deepspeed` (it needs "
            "GPUs and a CUDA toolkit), or choose another config"
        )
    processes, cores = getattr(config, "num_processes", 1) or 1, os.cpu_count() or 1
    if on_cpu_only() and processes > cores:  # a GPU config on a CPU machine: it ran, 8 processes on 2 cores, silently
        print(
            f"note: --accelerate_config {path} starts {processes} processes and this machine has no GPU, only {cores} "
            f"CPU cores: each process gets a share of them and a step trains {processes} batches; for CPUs, "
            "configs/accelerate/cpu_2proc.yaml",
            file=sys.stderr,
        )


def prepare_corpus(args: RunAllArguments, data_dir: Path, write: bool = True) -> tuple[list[str], list[str]]:
    """(pretraining files, extra flags for the alignment stages). The generated texts are written to `data_dir`
    only if `write` (a stage that reads them is asked for): `--stages ppo` on a run without SFT leaves no trace."""
    task_flags: list[str] = []
    if args.corpus not in CORPORA:
        fail(f"--corpus {args.corpus}: choose from {', '.join(CORPORA)}")
    if args.train_file and args.corpus != CORPORA[0]:
        fail(f"--corpus {args.corpus} and --train_file both name the pretraining text: give one")
    if args.corpus == "embedded":
        return embedded_corpus(data_dir, write)
    if args.train_file:
        files = [str(f) for f in data.expand_files(args.train_file)]  # check them before any stage runs
        text_files = [f for f in files if f.endswith(".txt")]
        task_flags = corpus_task_flags(text_files[0] if text_files else None)
    else:
        try:
            corpus = data.default_corpus()
            files = [str(corpus)]
            task_flags = ["--corpus_file", str(corpus)]
        except UsageError as err:  # a copy of the package without data/, offline
            print(f"note: {err}; pretraining on the embedded task corpus instead", flush=True)
            return embedded_corpus(data_dir, write)
    if args.with_facts:
        path = data_dir / FACTS_FILE
        if write and not path.is_file():
            runs.atomic_write_text(path, tasks.facts_corpus())
        if write and not (data_dir / SFT_MIX_FILE).is_file():
            runs.atomic_write_text(data_dir / SFT_MIX_FILE, tasks.facts_corpus(table_repeats=0))
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


def stage_command(args, stage, corpus_files, task_flags, extra) -> list[str]:
    if stage == "evaluate":
        run = runs.run_dir(args.run_name)
        policy = runs.latest_stage(run) or run / "ppo"
        cmd = [
            sys.executable,
            command_path("pipeline/evaluate.py"),
            str(policy),
            "--output_file",
            str(run / runs.EVALUATION_FILE),
        ]
        if runs.is_finished(run / "reward"):
            cmd += ["--reward_model", str(run / "reward")]
        return cmd + task_flags + extra
    if stage == REPORT:
        return (
            [sys.executable, command_path("pipeline/evaluate.py"), str(runs.run_dir(args.run_name)), "--report"]
            + task_flags
            + extra
        )
    cmd = launcher(args, stage) + [command_path(SCRIPTS[stage]), "--preset", args.preset, "--run_name", args.run_name]
    if stage in ("tokenizer", "pretrain"):
        cmd += ["--train_file", *corpus_files]
    else:
        cmd += task_flags
    mix = runs.run_dir(args.run_name) / runs.DATA_DIR / SFT_MIX_FILE
    if stage == "sft" and args.with_facts and mix.is_file():
        # Mixed training: the facts prose beside the chat rows keeps SFT from overwriting what pretraining stored.
        # Not the sums' steps table: in SFT's windows it took capital transfer (validation countries 34% -> 24%)
        # and gave the sums nothing (64% -> 60% of validation sums); pretraining alone stores it.
        cmd += ["--mix_text_file", str(mix)]
    folder = runs.stage_dir(args.run_name, stage)
    if folder.exists() and not runs.is_finished(folder) and not redo(extra):  # interrupted earlier
        cmd += ["--resume"] if stage in runs.RESUMABLE and runs.latest_checkpoint(folder) else ["--overwrite"]
    return cmd + extra


def check_stage_args(preset: str, extra: dict[str, list[str]]) -> None:
    """Each training stage's --stage_args, parsed now as the stage will parse them: a typo for SFT used to surface only
    once the tokenizer and the whole of pretraining had run."""
    for stage, flags in extra.items():
        # The chain decides where each stage writes and the next one reads: a stage sent elsewhere would leave the
        # next without its input, and the summary would name a folder the stage never wrote.
        owned = [
            f
            for f in flags
            if f.split("=")[0].lstrip("-").replace("-", "_") in ("run_name", "output_dir", "output_file")
        ]
        if owned:
            fail(f"--stage_args {stage}:{owned[0]}: the chain sets where its stages write; give run_all --run_name")
        path = "pipeline/evaluate.py" if stage in ("evaluate", REPORT) else SCRIPTS[stage]
        if any(f in ("-h", "--help") for f in flags):  # it printed the stage's help as run_all's, and exited 0
            fail(f"--stage_args {stage}:--help: a stage's flags are listed by `python {command_path(path)} --help`")
        # By path: run as a script, run_all has pipeline/ on sys.path, not the folder above it.
        spec = importlib.util.spec_from_file_location(f"fluxchat_stage_{stage}", REPO_ROOT / path)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
        spec.loader.exec_module(module)
        with contextlib.redirect_stderr(io.StringIO()):  # its notes (no bf16 on this CPU) come when it runs
            try:
                if stage in SCRIPTS:
                    parse_config(stage, module.ARGUMENTS, ["--preset", preset, *flags])
                else:
                    parse_config("evaluate", (module.EvaluateArguments,), ["--model", "runs/<run>", *flags])
            except UsageError as err:
                fail(f"--stage_args {stage}: {err}")


def _typed_at_the_terminal() -> bool:
    """Whether a SIGINT here was Ctrl-C at the terminal we run in the foreground of, which the terminal sends to the
    whole foreground process group, the stage with us. Else (no terminal: a container, a supervisor, `setsid`,
    `timeout -s INT`) it was sent to us alone."""
    try:
        tty = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


def run_stage(cmd: list[str]) -> int:
    """The stage's exit code. Ctrl-C reaches the stage too (one process group): wait while it stops and says where
    it stopped, where subprocess.call would kill it 0.25 s later, perhaps mid-save. A SIGTERM, or a SIGINT not typed
    at our terminal, sent to run_all alone (`timeout`, `kill`, `docker stop`) is passed on to the stage as SIGTERM
    (the launcher leaves SIGINT to the terminal; the stages stop the same way on both, once, ignoring a repeat).
    Then stop the chain."""
    # In the user's folder, as run_all: see `script`. run_all says itself which later stages an --overwrite leaves.
    process = subprocess.Popen(cmd, env={**os.environ, runs.LATER_STAGES_NOTED: "1"})
    signals: list[int] = []  # what reached us, the first deciding how the chain ends
    passed_on = False

    def on_signal(signum, frame) -> None:
        nonlocal passed_on
        signals.append(signum)
        typed = signum == signal.SIGINT and _typed_at_the_terminal()  # then the stage had it too
        if not typed and not passed_on:  # once: the stage stops at the first
            process.send_signal(signal.SIGTERM)
            passed_on = True

    # Handlers, not KeyboardInterrupt: Popen.wait() holds a KeyboardInterrupt back 0.25 s, long enough for a
    # SIGTERM after it to be taken as the first. A SIGINT ignored (a background job) stays ignored.
    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # Our stages exit 128 + the signal; a plain Python (the launcher passes a stage's failure on as 1) -signal.
    by_code = {130: signal.SIGINT, -signal.SIGINT: signal.SIGINT, 143: signal.SIGTERM, -signal.SIGTERM: signal.SIGTERM}
    signum = signals[0] if signals else by_code.get(code)
    if signum is not None:
        raise Interrupted(
            "run the same run_all command again to continue: finished stages are skipped, and "
            f"{', '.join(runs.RESUMABLE)} continue from their newest checkpoint",
            signum,
        )
    return code


def redo(stage_flags: list[str]) -> bool:
    """`--stage_args sft:--overwrite`: the user asks for the stage again, finished or not."""
    return any(flag in ("--overwrite", "--overwrite=true", "--overwrite=True") for flag in stage_flags)


def key_metric(stage: str, folder: Path) -> str:
    path = folder / (runs.TOKENIZER_STATS_FILE if stage == "tokenizer" else runs.METRICS_FILE)
    if stage == "evaluate":
        path = folder / runs.EVALUATION_FILE
    if stage == REPORT:
        path = folder / stage_reports.REPORT_JSON
    if not path.is_file():
        return ""
    m = json.loads(path.read_text())
    picks = {
        "tokenizer": [("bytes/token", "bytes_per_token")],
        "pretrain": [("val bits/byte", "eval_bits_per_byte")],
        "sft": [("task accuracy", "task_accuracy"), ("task accuracy", "eval_task_accuracy")],
        "reward": [("pair accuracy", "reward_accuracy"), ("pair accuracy", "eval_accuracy")],
        "ppo": [("mean reward", "mean_reward"), ("task accuracy", "task_accuracy")],
        "evaluate": [("task accuracy", "overall")],
        "grpo": [("task accuracy", "task_accuracy"), ("mean reward", "mean_reward")],
        "dpo": [("task accuracy", "task_accuracy"), ("pair accuracy", "eval_rewards/accuracies")],
    }.get(stage, [])
    if stage == REPORT:
        results = m.get("results", {})  # in chain order: the JSON's keys come back sorted
        return ", ".join(f"{s} {100 * results[s]['overall']:.1f}%" for s in m.get("stages", []) if s in results)
    flat = _flatten(m)
    found = [f"{label} {flat[key]:.3f}" for label, key in picks if isinstance(flat.get(key), (int, float))]
    return ", ".join(dict.fromkeys(found))


def note_stale_later_stages(args: RunAllArguments, stage: str, extra: dict[str, list[str]]) -> None:
    later = list(SCRIPTS)[list(SCRIPTS).index(stage) + 1 :]
    kept = [s for s in later if runs.is_finished(runs.stage_dir(args.run_name, s)) and not redo(extra.get(s, []))]
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


def merged_summary(run: Path, rows: list[dict]) -> list[dict]:
    """This command's rows, and the earlier rows of stages it did not run (`--stages report`, or a rerun that
    skips finished stages, kept no trace of the chain's timings), in chain order."""
    by_stage = {row["stage"]: row for row in _summary_rows(run)}
    by_stage.update({row["stage"]: row for row in rows if row["status"] == "ran" or row["stage"] not in by_stage})
    order = list(CHAIN)
    return sorted(
        by_stage.values(), key=lambda row: order.index(row["stage"]) if row["stage"] in order else len(order)
    )


def note_unapplied_stage_args(args: RunAllArguments, extra: dict[str, list[str]]) -> None:
    """--stage_args for a stage this command does not run say so, not silently nothing."""
    for stage, flags in extra.items():
        shown = " ".join(flags)
        if stage not in args.stages:
            print(f"note: --stage_args {stage}:{shown} not applied: {stage} is not in --stages", flush=True)
        elif stage in SCRIPTS and runs.is_finished(runs.stage_dir(args.run_name, stage)) and not redo(flags):
            print(
                f"note: --stage_args {stage}:{shown} not applied: {stage} is finished and is skipped; add "
                f"{stage}:--overwrite to train it again with them",
                flush=True,
            )


def _flatten(d: dict) -> dict:
    """Top-level keys, then keys of nested dicts where the top level has none (the summary reads either)."""
    out = {k: v for k, v in d.items() if not isinstance(v, dict)}
    for v in d.values():
        if isinstance(v, dict):
            for k, inner in _flatten(v).items():
                out.setdefault(k, inner)
    return out


def main(argv: list[str] | None = None) -> Path:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    preset = pop_flag(argv, "preset") or "tiny"  # one recipe folder for every stage, not a run_all.yaml
    if preset not in presets():
        fail(f"unknown preset '{preset}': choose from {', '.join(presets())}")
    preset_help = f"Recipe folder for every stage: configs/<preset>/ ({', '.join(presets())}; default tiny)."
    args, _ = parse_config("run_all", (RunAllArguments,), argv, preset_help=preset_help)
    args.preset = preset
    unknown = [s for s in args.stages if s not in CHAIN]
    if unknown:
        fail(
            f"--stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join([*SCRIPTS, 'evaluate', REPORT])}"
        )
    chain_order = [stage for stage in CHAIN if stage in args.stages]
    if chain_order != args.stages:  # `--stages sft pretrain`: SFT would fail for want of the model pretrain makes
        print(f"note: --stages run in chain order, once each: {' '.join(chain_order)}", flush=True)
        args.stages = chain_order
    extra: dict[str, list[str]] = {}
    for item in args.stage_args or []:
        stage, _, flag = item.partition(":")
        if stage not in CHAIN or not flag.startswith("--"):
            fail(
                f"--stage_args {item!r}: expected 'stage:--flag=value' with a stage from {', '.join(SCRIPTS)}, evaluate, {REPORT}"
            )
        extra.setdefault(stage, []).append(flag)
    check_stage_args(args.preset, extra)
    note_unapplied_stage_args(args, extra)

    if args.accelerate_config:
        check_accelerate_config(args.accelerate_config)
    run = runs.run_dir(args.run_name)
    reads_text = any(stage in TEXT_READERS for stage in args.stages)
    corpus_files, task_flags = prepare_corpus(args, run / runs.DATA_DIR, write=reads_text)
    summary = []
    ran = []  # the stages this command trains: an evaluation or report from before describes other models
    for stage in args.stages:
        folder = run if stage in ("evaluate", REPORT) else runs.stage_dir(args.run_name, stage)
        same_flags = ran_with(run, stage) == extra.get(stage, [])  # other evaluate/report flags: made again
        if stage == "evaluate":
            evaluation = run / runs.EVALUATION_FILE
            done = evaluation.is_file() and newer_than_every_stage(evaluation, run) and not ran and same_flags
        elif stage == REPORT:
            done = report_is_current(run) and not ran and same_flags
        else:
            done = runs.is_finished(folder) and not redo(extra.get(stage, []))
            if runs.is_finished(folder) and not done:
                note_stale_later_stages(args, stage, extra)
        if done:
            print(f"== {stage}: already finished, skipped", flush=True)
            summary.append({"stage": stage, "status": "skipped", "seconds": None, "metric": key_metric(stage, folder)})
            continue
        cmd = stage_command(args, stage, corpus_files, task_flags, extra.get(stage, []))
        print(f"== {stage}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = run_stage(cmd)
        seconds = round(time.perf_counter() - start, 1)
        if code != 0:
            fail(
                f"stage {stage} failed (exit {code}) after {seconds}s: fix the error above and re-run the same command to continue"
            )
        row = {"stage": stage, "status": "ran", "seconds": seconds, "metric": key_metric(stage, folder)}
        summary.append({**row, "flags": extra.get(stage, [])})
        if stage in SCRIPTS:
            ran.append(stage)

    runs.write_json(run / runs.SUMMARY_FILE, {"preset": args.preset, "stages": merged_summary(run, summary)})
    total = sum(s["seconds"] or 0 for s in summary)
    print(f"\n{'stage':<10} {'status':<8} {'wall':>8}  key metric")
    for s in summary:
        wall = f"{s['seconds']:.0f}s" if s["seconds"] is not None else "-"
        print(f"{s['stage']:<10} {s['status']:<8} {wall:>8}  {s['metric']}")
    print(f"{'total':<10} {'':<8} {total:>7.0f}s\n")
    if REPORT in args.stages and (run / stage_reports.REPORT_MD).is_file():
        print(f"stage report ({run / stage_reports.REPORT_MD}):\n{(run / stage_reports.REPORT_MD).read_text()}")
    if runs.latest_stage(run) is not None:  # a model to talk to (`--stages tokenizer` alone makes none)
        print(f"chat:  python pipeline/chat.py {run}")
        print(f"app:   python app.py --model {run}")
    return run


if __name__ == "__main__":
    run_cli(main)
