"""Write (or rewrite) the model card of a finished stage folder.

python pipeline/cards.py runs/demo/sft
"""

from __future__ import annotations

import sys
from pathlib import Path

from fluxchat import runs
from fluxchat.cards import stage_of, write_model_card
from fluxchat.cli import fail, run_cli

USAGE = "python pipeline/cards.py <stage folder>, e.g. runs/demo/sft"


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--help"], ["-h"]):
        print(f"usage: {USAGE}\n\n{__doc__.splitlines()[0]}")
        sys.exit(0)
    if len(argv) != 1 or argv[0].startswith("-"):
        fail(f"usage: {USAGE}")
    stage_dir = Path(argv[0])
    if not stage_dir.is_dir():
        fail(f"{stage_dir} is not a folder: give a stage folder such as runs/demo/sft")
    if not runs.is_finished(stage_dir):  # a run folder, its data/ or runs/ itself would get a model card
        stages = [stage for stage in runs.STAGES if runs.is_finished(stage_dir / stage)]
        if stages:
            fail(f"{stage_dir} is a run folder: give one of its stages, e.g. {stage_dir / stages[-1]}")
        fail(f"{stage_dir} is not a finished stage folder (no {runs.FINISHED_MARKER}): give one such as runs/demo/sft")
    try:
        card = write_model_card(stage_dir, stage_of(stage_dir))
    except OSError as err:  # a read-only mount (a model folder shared read-only): it was a traceback
        fail(f"cannot write the model card into {stage_dir} ({err.strerror or err})")
    print(f"wrote {card}")
    return card


if __name__ == "__main__":
    run_cli(main)
