"""Bits per character of any saved model on the held-out tail of a text file (default: tinyshakespeare's last 10%).

    python bench/heldout_bpc.py runs/demo/pretrain
    python bench/heldout_bpc.py runs/demo/pretrain --text_file ../shared/data/pretrain/tinyshakespeare.txt --fraction 0.1

The number a pretraining run logs is over *its* validation split; this one scores one fixed text, so
runs trained on different data mixes (e.g. the orchestrator's corpus + facts text) compare.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fluxchat import loading, pretraining
from fluxchat.cli import fail, run_cli

DEFAULT_TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"


def heldout_bits_per_char(model_dir: str, text_file: Path, fraction: float) -> dict:
    model, tokenizer = loading.load_model_and_tokenizer(model_dir)
    text = text_file.read_text(encoding="utf-8")
    tail = text[int(len(text) * (1 - fraction)) :]
    tokens = pretraining.tokenize_documents(tokenizer, [tail])
    blocks = pretraining.Blocks(tokens, model.config.n_positions)
    nats, predicted = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), 32):
            batch = torch.stack([blocks[i]["input_ids"] for i in range(start, min(start + 32, len(blocks)))])
            loss = model(input_ids=batch, labels=batch).loss
            n = batch.shape[0] * (batch.shape[1] - 1)
            nats += loss.item() * n
            predicted += n
    bytes_per_token = len(tail.encode("utf-8")) / len(tokens)
    return {
        "model": model_dir,
        "text_file": str(text_file),
        "heldout_fraction": fraction,
        "heldout_chars": len(tail),
        "bits_per_byte": round(nats / predicted / math.log(2) / bytes_per_token, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder")
    parser.add_argument("--text_file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--fraction", type=float, default=0.1, help="held-out tail of the file")
    parser.add_argument("--output", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    if not args.text_file.is_file():
        fail(f"--text_file {args.text_file}: no such file")
    result = heldout_bits_per_char(loading.resolve_model(args.model), args.text_file, args.fraction)
    print(
        f"| model | text | held-out chars | bits per byte |\n|---|---|---|---|\n"
        f"| {result['model']} | {Path(result['text_file']).name} (last {args.fraction:.0%}) | {result['heldout_chars']:,} | {result['bits_per_byte']} |"
    )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
