"""Every benchmark script runs end to end in --smoke mode, prints its table and writes its JSON.

Smoke mode measures nothing (a few steps on tiny shapes); these tests keep the scripts working.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, run_script

# script -> a column its table must have (proves the real table, not an error message, was printed)
BENCHMARKS = {
    "pretrain_throughput": "tokens_per_s",
    "time_to_quality": "val_bits_per_char",
    "memory": "peak_rss_MB",
    "generation": "first_token_ms",
    "pipeline_time": "wall_s",
    "gpu": "device",
    "app_load": "p95_ms",
    "fact_recall": "capital_recall",
}


# Longest smoke run first, so the two workers finish together (pretrain_throughput alone is ~a third of the total).
LONGEST_FIRST = (
    "pretrain_throughput",
    "fact_recall",
    "app_load",
    "pipeline_time",
    "memory",
    "time_to_quality",
    "generation",
    "gpu",
)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every benchmark's smoke run, two at a time up front: each is mostly imports on one core, and smoke mode
    measures nothing that sharing the machine could spoil (51 s instead of 96 on 2 cores). One torch thread each
    (--threads 1, and OMP_NUM_THREADS=1 for the processes they start): two runs of two threads on two cores
    made every op of a tiny model wait for a descheduled thread (a pair of them: 57-63 s against 32-34 s, loaded)."""
    folder = tmp_path_factory.mktemp("bench")

    def smoke(name):
        output = folder / f"{name}.json"
        command = [PYTHON, REPO / "bench" / f"{name}.py", "--smoke", "--threads", 1, "--output", output]
        return run_script(*command, env={"OMP_NUM_THREADS": "1"}, timeout=300), output

    assert sorted(LONGEST_FIRST) == sorted(BENCHMARKS)
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(smoke, name) for name in LONGEST_FIRST}
    return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_smoke(name, smoke_runs):
    proc, output = smoke_runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next((line for line in proc.stdout.splitlines() if line.startswith("| ")), "")
    assert BENCHMARKS[name] in header, proc.stdout[-2000:]
    payload = json.loads(output.read_text())
    assert payload["benchmark"] == name and payload["smoke"] is True
    assert payload["results"], payload
    machine = payload["machine"]
    for key in ("cpu", "cores", "torch", "transformers", "date", "command"):
        assert machine[key], key
    assert "--smoke" in machine["command"]
    if name == "pretrain_throughput":  # both sides measured, and their ratio, for every shape
        by_side = {(row["shape"], row["side"]): row["tokens_per_s"] for row in payload["results"]}
        for shape in {shape for shape, _ in by_side}:
            pipeline, plain = by_side[shape, "pipeline"], by_side[shape, "plain"]
            assert pipeline > 0 and plain > 0
            assert by_side[shape, "ratio pipeline/plain"] == pytest.approx(
                pipeline / plain, rel=0.01, abs=5e-4
            )  # one round: one pair, its ratio rounded to 3 decimals (smoke's 3 steps can make it 0.013)
    if name == "app_load":  # the load test's pass criteria, not just its table
        row = payload["results"][0]
        assert row["replies"] == 6 and row["errors"] == 0 and row["cross_talk"] == 0 and row["memory_bounded"], row


def test_readme_benchmark_table_is_generated_from_the_results():
    """The README quotes bench/results/*.json through bench/report.py: editing one without the other fails here."""
    proc = run_script(PYTHON, REPO / "bench" / "report.py", "--check", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    readme = (REPO / "README.md").read_text()
    for name in ("time_to_quality", "pretrain_throughput", "memory", "app_load", "crash_safety"):
        payload = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
        assert f"`{payload['machine']['command']}`" in readme, name


def test_report_rewrites_only_its_table_and_names_missing_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin (python bench/report.py) -->\nstale\n<!-- bench:end -->\noutro\n")
    proc = run_script(
        PYTHON, REPO / "bench" / "report.py", "--results", tmp_path / "none", "--readme", readme, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert "| not run yet | | `python bench/memory.py` |" in text
    proc = run_script(PYTHON, REPO / "bench" / "report.py", "--readme", tmp_path / "none.md", timeout=60)
    assert proc.returncode != 0 and "--readme" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv, error",
    [
        (["bench/timed_side.py", "--help"], "error: usage: python bench/timed_side.py OUT.json pipeline"),
        (["bench/heldout_bpc.py", "/nonexistent"], "error: --model /nonexistent: no such folder"),
        (["bench/heldout_bpc.py", "runs", "--text_file", "/nonexistent"], "error: --text_file /nonexistent: no such"),
    ],
)
def test_a_benchmark_given_bad_arguments_says_so_in_one_line(argv, error):
    """Benchmarks are commands too: a ValueError from unpacking argv, or a UsageError's traceback, was all they said."""
    result = run_script(PYTHON, *argv, env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(error) and result.stderr.count("\n") == 1, result.stderr
