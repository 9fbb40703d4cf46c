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
import io
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fluxchat import chain, launch, runs
from fluxchat import report as stage_reports
from fluxchat.cli import UsageError, fail, run_cli
from fluxchat.config import parse_config, pop_flag, presets


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
        default_factory=lambda: list(chain.CHAIN),
        metadata={"help": "Stages to run (always in chain order: each reads what the one before it made)."},
    )
    accelerate_config: str | None = field(
        default=None, metadata={"help": "accelerate config for the training stages (see configs/accelerate/)."}
    )
    stage_args: list[str] | None = field(
        default=None, metadata={"help": "Extra flags as 'stage:--flag=value' (e.g. pretrain:--max_steps=100)."}
    )


def check_stage_args(preset: str, extra: dict[str, list[str]]) -> None:
    """Each step's --stage_args, parsed now as the stage will parse them: a typo for SFT used to surface only once
    the tokenizer and the whole of pretraining had run."""
    if not extra:
        return
    # Here, not at the top: the training stages' arguments import TRL (seconds), needed only with --stage_args.
    from fluxchat.stage_arguments import ARGUMENTS

    for stage, flags in extra.items():
        with contextlib.redirect_stderr(io.StringIO()):  # its notes (no bf16 on this CPU) come when it runs
            try:
                if stage in chain.SCRIPTS:
                    parse_config(stage, ARGUMENTS[stage], ["--preset", preset, *flags])
                else:
                    parse_config("evaluate", ARGUMENTS["evaluate"], ["--model", "runs/<run>", *flags])
            except UsageError as err:
                fail(f"--stage_args {stage}: {err}")


def main(argv: list[str] | None = None) -> Path:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    preset = pop_flag(argv, "preset") or "tiny"  # one recipe folder for every stage, not a run_all.yaml
    if preset not in presets():
        fail(f"unknown preset '{preset}': choose from {', '.join(presets())}")
    preset_help = f"Recipe folder for every stage: configs/<preset>/ ({', '.join(presets())}; default tiny)."
    args, _ = parse_config("run_all", (RunAllArguments,), argv, preset_help=preset_help)
    stages = chain.chain_order(args.stages)
    extra = chain.split_stage_args(args.stage_args or [])
    check_stage_args(preset, extra)
    chain.note_unapplied_stage_args(args.run_name, stages, extra)
    if args.accelerate_config:
        launch.check_accelerate_config(args.accelerate_config)
    run = runs.run_dir(args.run_name)
    reads_text = any(stage in chain.TEXT_READERS for stage in stages)
    corpus_files, task_flags = chain.prepare_corpus(
        run / runs.DATA_DIR, args.train_file, args.corpus, args.with_facts, write=reads_text
    )

    summary = []
    trained = []  # the stages this command trains: an evaluation or report from before describes other models
    for stage in stages:
        flags = extra.get(stage, [])
        if chain.is_done(args.run_name, stage, flags, trained):
            print(f"== {stage}: already finished, skipped", flush=True)
            row = {"stage": stage, "status": "skipped", "seconds": None}
            summary.append({**row, "metric": chain.key_metric(args.run_name, stage)})
            continue
        if stage in chain.SCRIPTS and runs.is_finished(runs.stage_dir(args.run_name, stage)):
            chain.note_stale_later_stages(args.run_name, stage, extra)
        cmd = chain.stage_command(
            stage, args.run_name, preset, args.accelerate_config, corpus_files, task_flags, flags, args.with_facts
        )
        print(f"== {stage}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = launch.run_stage(cmd)
        seconds = round(time.perf_counter() - start, 1)
        if code != 0:
            fail(
                f"stage {stage} failed (exit {code}) after {seconds}s: fix the error above and re-run the same command to continue"
            )
        row = {"stage": stage, "status": "ran", "seconds": seconds, "metric": chain.key_metric(args.run_name, stage)}
        summary.append({**row, "flags": flags})
        if stage in chain.SCRIPTS:
            trained.append(stage)

    chain.write_summary(run, preset, summary)
    print(f"\n{chain.summary_table(summary)}\n")
    if chain.REPORT in stages and (run / stage_reports.REPORT_MD).is_file():
        print(f"stage report ({run / stage_reports.REPORT_MD}):\n{(run / stage_reports.REPORT_MD).read_text()}")
    if runs.latest_stage(run) is not None:  # a model to talk to (`--stages tokenizer` alone makes none)
        print(f"chat:  python pipeline/chat.py {run}")
        print(f"app:   python app.py --model {run}")
    return run


if __name__ == "__main__":
    run_cli(main)
