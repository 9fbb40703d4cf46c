"""What every benchmark shares: the command line (--smoke, --output), machine info, the table, the JSON;
and the app started as a user starts it, with its debug log of prompts (bench/app_load.py, tests/test_browser.py)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
# The workplace's shared copy (../shared/data, or FLUXCHAT_SHARED_DATA) where there is one, else the identical file
# the project ships: a fresh clone on its own benchmarks too.
SHAKESPEARE = (
    Path(os.environ.get("FLUXCHAT_SHARED_DATA", REPO.parent / "shared" / "data")) / "pretrain" / "tinyshakespeare.txt"
)
if not SHAKESPEARE.is_file():
    SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"

# Benchmarks never touch the network (TRL/transformers ping the Hub otherwise).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# A model small enough that a benchmark's --smoke run checks the script in seconds (it measures nothing).
SMOKE_MODEL_FLAGS = [
    "--n_layer",
    "2",
    "--n_embd",
    "64",
    "--n_head",
    "2",
    "--block_size",
    "32",
    "--per_device_train_batch_size",
    "4",
]
APP_PROMPT_MARKER = " fluxchat.app: prompt "  # app.py --log_level debug: this, then the prompt as JSON


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke", action="store_true", help="A few steps at tiny sizes: checks the script runs, measures nothing."
    )
    p.add_argument("--output", type=Path, default=RESULTS / f"{name}.json", help="Where the JSON results go.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, one per core).")
    return p


def set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # > cores means other work shared the machine
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(r, widths)) + " |")


def write_results(path: Path, name: str, rows: list[dict], smoke: bool, **extra) -> None:
    path = Path(path)
    if smoke and path.resolve().parent == RESULTS.resolve():
        # A smoke run measures nothing: in bench/results it replaced the measured figures, and the README's table
        # (bench/report.py) then quoted the smoke's.
        path = Path(tempfile.gettempdir()) / f"fluxchat-bench-smoke-{path.name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "smoke": smoke, "machine": machine_info(), **extra, "results": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nresults -> {path}")


def corpus(smoke: bool) -> Path:
    """tinyshakespeare; in smoke mode its first 40,000 characters, so tokenizing and training take seconds."""
    if not smoke:
        return SHAKESPEARE
    path = Path(tempfile.gettempdir()) / "fluxchat-bench-smoke-corpus.txt"
    if not path.is_file():
        path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def train_tokenizer(
    output_dir: Path, tokenizer_type: str = "bpe", vocab_size: int = 1024, text: Path = SHAKESPEARE
) -> Path:
    """One of our tokenizers trained through the real tokenizer/train.py."""
    from tokenizer import train

    if (output_dir / "stage_complete.json").is_file():
        return output_dir
    with contextlib.redirect_stdout(sys.stderr):
        return train.main(
            [
                "--preset",
                "tiny",
                "--train_file",
                str(text),
                "--tokenizer_type",
                tokenizer_type,
                "--vocab_size",
                str(vocab_size),
                "--output_dir",
                str(output_dir),
                "--overwrite",
            ]
        )


@contextlib.contextmanager
def trainer_callbacks(*callbacks):
    """Run pipeline/pretrain.py's real main() with extra TrainerCallbacks (timers, a wall-clock stop),
    by wrapping the Trainer class main() builds."""
    from fluxchat import pretraining  # here, not at the top: bench/report.py needs no torch

    original = pretraining.BitsPerByteTrainer

    class WithCallbacks(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for callback in callbacks:
                self.add_callback(callback)

    pretraining.BitsPerByteTrainer = WithCallbacks
    try:
        yield
    finally:
        pretraining.BitsPerByteTrainer = original


def step_timer():
    """A TrainerCallback recording the wall time at the end of every optimizer step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # GPU work is asynchronous: time what has finished
            self.step_ends.append(time.perf_counter())

    return StepTimer()


def measured_peak_flops(threads: int, size: int = 2048, repeats: int = 5, dtype=None, device: str = "cpu") -> float:
    """The best fp32 matmul FLOP/s this machine gives with the current torch threads: the MFU denominator on CPU."""
    import torch

    dtype = dtype or torch.float32
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gpt2_flops_per_token(n_params_non_embedding: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """nanoGPT's estimate_mfu (PaLM appendix B): 6N for the weights plus 12*L*H*Q*T for attention (H*Q = n_embd)."""
    return 6 * n_params_non_embedding + 12 * n_layer * n_embd * block_size


def non_embedding_params(model) -> int:
    """Parameters minus the position embedding (the token embedding is tied to the LM head, so it counts)."""
    return sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(model, log_path: Path, *flags, timeout: float = 120):
    """`python app.py --model <model> --port <free port> --log_level debug <flags>`, its output in log_path;
    yields (url, process) once the app answers, and stops it afterwards."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "app.py"),
                "--model",
                str(model),
                "--port",
                str(port),
                "--log_level",
                "debug",
                *map(str, flags),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_answering(url, process, log_path, timeout)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_answering(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"app.py did not answer on {url} within {timeout:.0f} s:\n{Path(log_path).read_text()[-3000:]}"
                ) from None
            time.sleep(0.5)


def log_lines(log_path: Path, since: int = 0) -> list[str]:
    """The app's log lines written after byte offset `since` (so a caller reads only its own)."""
    with open(log_path, "rb") as log:
        log.seek(since)
        return log.read().decode("utf-8").splitlines()


def logged_prompts(log_path: Path, since: int = 0) -> list[dict]:
    """Every prompt the app's model saw, in order: {"session", "model", "messages"} (the trimmed conversation)."""
    return [
        json.loads(line.split(APP_PROMPT_MARKER, 1)[1])
        for line in log_lines(log_path, since)
        if APP_PROMPT_MARKER in line
    ]


def pretrain_argv(preset: str, text: Path, tokenizer_dir: Path, out: Path, steps: int, settings: dict) -> list[str]:
    """Flags for a timed `pipeline/pretrain.py` run: a fresh output folder, no evaluation or checkpoints while timed,
    one short sample at the end, and `settings` (model shape, batch, optimizer) as flags."""
    fixed = ["--preset", preset, "--train_file", text, "--tokenizer_name_or_path", tokenizer_dir, "--output_dir", out]
    fixed += ["--overwrite", "--max_steps", steps, "--eval_strategy", "no", "--save_strategy", "no"]
    fixed += ["--sample_prompts", "ROMEO:", "--sample_max_new_tokens", 8]
    return [str(a) for a in fixed] + [f"--{key}={value}" for key, value in settings.items()]
