"""How many facts pretraining stores, by how often the facts text states each one: greedy recall of capitals
and populations by the tiny pretrained model.

    python bench/fact_recall.py                               # --fact_repeats 24 48 96: ~6 min each on 2 cores
    python bench/fact_recall.py --fact_repeats 96 --table_repeats 192   # the worked sums' steps table 192 times
    python bench/fact_recall.py --model runs/demo/pretrain    # one saved model, test countries included

The chat can only recall what pretraining stored; SFT only teaches the way to it. Each sweep point writes the
facts text (`fluxchat.tasks.facts_corpus`) with 50 *training* countries (`tasks.validation_countries`) left out
of its dialogues, so they appear in prose only, like the held-out test countries; trains the tokenizer and the
tiny preset on tinyshakespeare + that text, as `run_all.py` does; then completes "The capital of X is" and
"The capital of X is Y. Y has approximately" greedily. Choosing the repeats on these countries never looks at
the test countries. Each point also scores tinyshakespeare's held-out tail (`bench/heldout_bpc.py`): what more
facts cost the Shakespeare model.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

import common
import torch
from heldout_bpc import heldout_bits_per_char

from fluxchat import loading, tasks
from fluxchat.cli import run_cli
from fluxchat.report import wilson_interval


def recall(model_dir: Path, countries: list[str]) -> dict:
    """Share of `countries` whose capital, and whose capital's population, the model completes greedily."""
    model, tokenizer = loading.load_model_and_tokenizer(str(model_dir))
    model.eval()
    facts = {country: (capital, population) for country, capital, population in tasks.FACTS}

    def completes(prompt: str, answer: str) -> bool:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        return re.match(rf"{re.escape(answer)}\b", text) is not None

    capitals = populations = 0
    for country in countries:
        capital, population = facts[country]
        capitals += completes(f"The capital of {country} is", capital)
        populations += completes(f"The capital of {country} is {capital}. {capital} has approximately", population)
    n = len(countries)
    row = {"n": n}
    for name, hits in (("capital", capitals), ("population", populations)):
        low, high = wilson_interval(hits, n)
        row[f"{name}_recall"] = round(hits / n, 3)
        row[f"{name}_95ci"] = f"{100 * low:.0f}-{100 * high:.0f}%"
    return row


def sweep_point(repeats: int, work: Path, smoke: bool, table_repeats: int = tasks.TABLE_REPEATS) -> dict:
    """Facts text at `repeats`, tokenizer, tiny pretraining, then recall on the prose-only countries."""
    from pipeline import pretrain
    from tokenizer import train

    shakespeare = common.corpus(smoke)
    work.mkdir(parents=True, exist_ok=True)
    facts = work / "facts.txt"
    facts.write_text(
        tasks.facts_corpus(fact_repeats=repeats, prose_only=tasks.validation_countries(), table_repeats=table_repeats)
    )
    files = ["--train_file", str(shakespeare), str(facts)]
    # smoke: the smallest model, with room for the longest prompt (~30 tokens) and its 12-token completion
    short = [*common.SMOKE_MODEL_FLAGS, "--block_size", "64", "--max_steps", "4"] if smoke else []
    with contextlib.redirect_stdout(sys.stderr):
        train.main(["--preset", "tiny", *files, "--output_dir", str(work / "tokenizer"), "--overwrite"])
        model = pretrain.main(
            ["--preset", "tiny", *files, "--tokenizer_name_or_path", str(work / "tokenizer")]
            + ["--output_dir", str(work / "pretrain"), "--overwrite", "--save_strategy", "no", *short]
        )
    bpc = heldout_bits_per_char(str(model), shakespeare, 0.1)["bits_per_byte"]
    row = {"fact_repeats": repeats, "table_repeats": table_repeats, "countries": "validation (prose only)"}
    row["facts_chars"] = facts.stat().st_size
    return {**row, **recall(model, tasks.validation_countries()), "shakespeare_bits_per_byte": bpc}


def main() -> None:
    args = common.parser("fact_recall", __doc__)
    args.add_argument("--fact_repeats", type=int, nargs="+", default=[24, 48, 96])
    args.add_argument(
        "--table_repeats", type=int, default=tasks.TABLE_REPEATS, help="Repeats of the worked sums' steps table."
    )
    args.add_argument("--model", type=Path, help="Score this pretrained model instead of training the sweep.")
    args.add_argument(
        "--work_dir", type=Path, default=None, help="Default runs/bench-fact-recall (smoke: a temp folder)."
    )
    args = args.parse_args()
    common.set_threads(args.threads)
    if args.model:
        heldout = sorted(tasks.heldout_countries())
        training = [c for c, _, _ in tasks.FACTS if c not in tasks.heldout_countries()]
        rows = [
            {"model": str(args.model), "countries": "held-out (test)", **recall(args.model, heldout)},
            {"model": str(args.model), "countries": "training", **recall(args.model, training)},
        ]
    else:
        repeats = [1] if args.smoke else args.fact_repeats
        runs_root = Path(os.environ.get("FLUXCHAT_RUNS_DIR", common.REPO / "runs"))
        work = args.work_dir or (Path(tempfile.mkdtemp()) if args.smoke else runs_root / "bench-fact-recall")
        rows = [
            sweep_point(r, work / f"repeats-{r}-tables-{args.table_repeats}", args.smoke, args.table_repeats)
            for r in repeats
        ]
    common.print_table("Fact recall of the pretrained model (greedy completion)", rows)
    common.write_results(args.output, "fact_recall", rows, args.smoke)


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
