"""One side of bench/pretrain_throughput.py, timed in a fresh process: writes the wall time at the end of
every optimizer step as JSON. Every side runs this way, so none inherits another's heap, threads or
allocator state, and all are timed by the same clock and the same estimator.

    python bench/timed_side.py OUT.json pipeline <pipeline/pretrain.py flags>
    accelerate launch ... bench/timed_side.py OUT.json pipeline <flags>   # the README's launcher, same main()
    python bench/timed_side.py OUT.json plain SETTINGS.json TEXT TOKENIZER_DIR STEPS
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import common
import plain_gpt

from fluxchat import pretraining
from fluxchat.cli import fail, main_process, run_cli


def pipeline_side(argv: list[str]) -> list[float]:
    """The real `pipeline/pretrain.py` main() (what `python pipeline/pretrain.py` runs) with a step timer."""
    from pipeline import pretrain

    timer = common.step_timer()
    with common.trainer_callbacks(timer), contextlib.redirect_stdout(sys.stderr):
        pretrain.main(argv)
    return timer.step_ends


def plain_side(settings_file: str, text: str, tokenizer_dir: str, steps: str) -> list[float]:
    """bench/plain_gpt.py's nanoGPT loop on the same tokens (the corpus's first 90%) and settings."""
    from transformers import AutoTokenizer

    from fluxchat.data import load_text

    settings = json.loads(Path(settings_file).read_text())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_docs, _ = load_text([text], None, "text", 0.1)
    tokens = pretraining.tokenize_documents(tokenizer, train_docs)
    return plain_gpt.train(tokens, settings, len(tokenizer), int(steps), seed=settings.get("seed", 1337))


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] not in ("pipeline", "plain") or sys.argv[1].startswith("-"):
        fail(
            "usage: " + " | ".join(line.strip() for line in __doc__.splitlines() if line.strip().startswith("python"))
        )
    out, side, *rest = sys.argv[1:]
    if side == "plain" and len(rest) != 4:
        fail("usage: python bench/timed_side.py OUT.json plain SETTINGS.json TEXT TOKENIZER_DIR STEPS")
    step_ends = pipeline_side(rest) if side == "pipeline" else plain_side(*rest)
    if main_process():
        Path(out).write_text(json.dumps(step_ends))


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
