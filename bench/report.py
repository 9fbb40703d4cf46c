"""Write the README's benchmark table from bench/results/*.json, so the numbers quoted are the numbers measured.

    python bench/report.py            # rewrite the table between the bench markers in README.md
    python bench/report.py --check    # exit 1 if README.md is out of date with bench/results (a test runs this)

Each row names the command that produced it, the machine (CPU, cores, load average during the run:
above the core count means other work shared the machine) and the date, all read from the JSON.
A benchmark without results says which command makes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common

from fluxchat.cli import run_cli

BEGIN, END = "<!-- bench:begin (python bench/report.py) -->", "<!-- bench:end -->"


def _by(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def throughput(rows: list[dict]) -> str:
    parts = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        (pipe,), (plain,), (ratio,) = (
            _by(rows, shape=shape, side=side) for side in ("pipeline", "plain", "ratio pipeline/plain")
        )
        launched = _by(rows, shape=shape, side="ratio accelerate launch/plain")
        # results written before the plain side became bench/plain_gpt.py timed transformers' model in a hand loop
        plain_name = "plain PyTorch GPT" if launched else "plain loop"
        parts.append(
            f"{shape}: pipeline {pipe['tokens_per_s']:,.0f} tokens/s (MFU {pipe['mfu_pct']:.0f}%) vs {plain_name} "
            f"{plain['tokens_per_s']:,.0f}, **{ratio['tokens_per_s']:.2f}×**"
            + (f", `accelerate launch` {launched[0]['tokens_per_s']:.2f}×" if launched else "")
        )
    return "; ".join(parts)


def _tokenizing(row: dict) -> str:
    # Worker processes until 2026-12-07, the tokenizer's own threads since.
    if "tokenize_threads" in row:
        return f"{row['tokenize_threads']} threads"
    return f"{row['tokenize_processes']} processes"


def data_scale(rows: list[dict]) -> str:
    small, large, gap = rows
    return (
        f"{large['text_MB']:,.0f} MB corpus: peak {max(large['first_peak_rss_MB'], large['second_peak_rss_MB']):,} MB vs "
        f"{max(small['first_peak_rss_MB'], small['second_peak_rss_MB']):,} MB for {small['text_MB']:,.0f} MB "
        f"(**{gap['peak_rss_gap_MB']:+} MB**, aim ≤ 100); tokenized at {large['tokenize_MB_per_s']:.2f} MB/s "
        f"({_tokenizing(large)}); with the cache, data ready {large['second_data_ready_s']:.0f} s after launch"
    )


def time_to_quality(rows: list[dict]) -> str:
    (row,) = rows
    return (
        f"**{row['val_bits_per_char']:.3f} bits/char** on tinyshakespeare's last 10% after {row['steps']} steps in "
        f"{row['train_s']:.0f} s ({row['tokens_per_s']:,.0f} tokens/s, {row['params_M']}M params; budget {row['budget_s']:.0f} s; "
        "aim ≤ 2.30, nanoGPT's CPU recipe ~2.72)"
    )


def memory(rows: list[dict]) -> str:
    return (
        "; ".join(
            f"{r['model']} ({r['params_M']}M): **{r['peak_rss_GB']:.2f} GB** peak, {r['rss_after_imports_MB']} MB of it "
            "importing torch + transformers"
            for r in rows
        )
        + " (aim 0.6 GB)"
    )


def generation(rows: list[dict]) -> str:
    parts = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        (cached,), (uncached,) = _by(rows, shape=shape, kv_cache=True), _by(rows, shape=shape, kv_cache=False)
        parts.append(
            f"{shape}: first token {cached['first_token_ms']:.1f} ms, {cached['tokens_per_s']:,.1f} tokens/s with the KV cache, "
            f"{uncached['tokens_per_s']:,.1f} without"
        )
    return "; ".join(parts) + " (batch 1)"


def pipeline_time(rows: list[dict], launched_seconds: float | None = None) -> str:
    # The stages' sum leaves out the evaluation and stage report that follow them (and the launcher's own time):
    # the whole command's wall time is the figure the README's "minutes end to end" quotes.
    text = ", ".join(f"{r['stage']} {r['wall_s']:.0f} s" for r in rows if r["stage"] != "total")
    text += f"; the stages {rows[-1]['wall_s'] / 60:.1f} min"
    if launched_seconds:
        text += f", **the whole command {launched_seconds / 60:.1f} min** (evaluation and stage report included)"
    return text


def fact_recall(rows: list[dict]) -> str:
    def pct(key: str) -> str:
        return " / ".join(f"{100 * r[key]:.0f}%" for r in rows)

    return (
        f"facts prose {' / '.join(str(r['fact_repeats']) for r in rows)} times: capital recall **{pct('capital_recall')}**, "
        f"population {pct('population_recall')} (n={rows[0]['n']} prose-only training countries); "
        f"tinyshakespeare {' / '.join(str(r['shakespeare_bits_per_byte']) for r in rows)} bits/byte"
        + (f"; steps table {rows[0]['table_repeats']} times" if "table_repeats" in rows[0] else "")
    )


def app_load(rows: list[dict]) -> str:
    (r,) = rows
    return (
        f"{r['clients']} clients × {r['turns']} turns: {r['replies']} replies, {r['errors']} errors, {r['cross_talk']} cross-talk; "
        f"reply latency p50 {r['p50_ms']:,} ms, p95 {r['p95_ms']:,} ms ({r['max_new_tokens']} new tokens, concurrency {r['concurrency']}); "
        f"app RSS {r['rss_warm_MB']} → {r['rss_end_MB']} MB"
    )


def crash_safety(rows: list[dict]) -> str:
    return "; ".join(
        f"{r['stage']}: {r['kills']} kills, {r['resumed_steps']}/{r['ref_steps']} steps, final eval loss "
        f"Δ {r['diff']:.1e}, {'passed' if r['passed'] else 'FAILED'}"
        for r in rows
    )


def gpu(rows: list[dict], chain: dict | None = None) -> str:
    if rows[0]["device"] == "none":
        return "not run: no GPU on the machine that ran it"
    parts = [
        f"{r['variant']}: {r['tokens_per_s']:,} tokens/s, **MFU {r['mfu_pct']}%**, {r['peak_mem_GB']} GB" for r in rows
    ]
    text = (
        f"{rows[0]['device']}, {rows[0]['params_M']}M params, bf16, batch {rows[0]['batch']} x {rows[0]['context']}: "
        + "; ".join(parts)
    )
    if chain and chain.get("stages"):
        stages = ", ".join(
            f"{s['stage']} {s['seconds']:.0f} s ({s['metric']})" for s in chain["stages"] if s["seconds"] is not None
        )
        text += f". `small` chain (`{chain['command']}`): {stages}; **total {chain['wall_s'] / 60:.1f} min**"
    return text


SUMMARIES = {  # README order
    "time_to_quality": ("time to quality, 5-minute budget", time_to_quality),
    "pretrain_throughput": ("pipeline vs a plain PyTorch GPT", throughput),
    "memory": ("peak memory while pretraining", memory),
    "data_scale": ("pretraining data at scale (token shards)", data_scale),
    "generation": ("generation", generation),
    "pipeline_time": ("tiny chain, wall time per stage", pipeline_time),
    "fact_recall": ("facts the tiny pretrained model stores", fact_recall),
    "app_load": ("app under load", app_load),
    "crash_safety": ("kill -9 and resume", crash_safety),
    "gpu": ("GPU: gpt2-small-shaped pretraining and the small chain", gpu),
}


def table(results_dir: Path) -> str:
    lines = ["| benchmark | result | machine, date | command |", "|---|---|---|---|"]
    for name, (title, summarize) in SUMMARIES.items():
        path = results_dir / f"{name}.json"
        if not path.is_file():
            lines.append(f"| {title} | not run yet | | `python bench/{name}.py` |")
            continue
        payload = json.loads(path.read_text(encoding="utf-8"))
        m = payload["machine"]
        machine = f"{m['cpu']}, {m['cores']} cores, load {m['load_average_1min']}, {m['date'][:10]}" + (
            " (smoke)" if payload["smoke"] else ""
        )
        extra = {"gpu": payload.get("chain"), "pipeline_time": payload.get("launched_wall_seconds")}
        summary = summarize(payload["results"], extra[name]) if name in extra else summarize(payload["results"])
        lines.append(f"| {title} | {summary} | {machine} | `{m['command']}` |")
    return "\n".join(lines)


def render(readme: str, results_dir: Path) -> str:
    if BEGIN not in readme or END not in readme:
        sys.exit(f"error: README has no {BEGIN} ... {END} markers to write the table between")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(results_dir)}\n{END}{tail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--results", type=Path, default=common.RESULTS, help="Folder of benchmark JSON files.")
    p.add_argument("--readme", type=Path, default=common.REPO / "README.md")
    p.add_argument("--check", action="store_true", help="Change nothing; exit 1 if the README's table is out of date.")
    args = p.parse_args()
    if not args.readme.is_file():
        sys.exit(f"error: --readme {args.readme} does not exist")
    current = args.readme.read_text(encoding="utf-8")
    updated = render(current, args.results)
    if args.check:
        if updated != current:
            sys.exit(
                f"error: {args.readme}'s benchmark table is out of date with {args.results}: run `python bench/report.py`"
            )
        print(f"{args.readme} is up to date with {args.results}")
        return
    args.readme.write_text(updated, encoding="utf-8")
    print(f"benchmark table -> {args.readme}")


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
