"""The app under load: many gradio_client users at once, each in its own session, several turns each.

    python bench/app_load.py                                    # 16 clients x 10 turns on a tiny model it trains first
    python bench/app_load.py --model runs/demo/ppo --clients 32 --turns 5 --concurrency 8
    python bench/app_load.py --smoke                            # 3 clients x 2 turns

Starts the real app as a user would (`python app.py --model ... --log_level debug`), releases all clients
at once (a barrier) and times every reply from the request to the final text. It passes (exit code 0)
only if (issue 7):
- no request failed;
- no cross-talk: from the app's debug log of prompts, the prompt the model saw for each client's turn is a
  suffix (the app drops the oldest turns to fit the context) of that client's own conversation, its
  messages and the replies it received, and each client has exactly one session, its own;
- memory is bounded: the app's RSS (process and children, sampled from /proc) grows at most
  --max_growth_mb from the end of the first round of turns (every client answered once) to the end.
Without --model it first trains a tiny model (our tokenizer and a few pretraining steps on tinyshakespeare,
offline): the tiny preset's shape, whose nonsense replies never end early, so every reply is
--max_new_tokens long (the worst case for that length). --threads sets torch's threads for that training
only; the app picks its own.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

REPLY_TIMEOUT_SECONDS = 300
RSS_SAMPLE_SECONDS = 0.2
SMOKE_MODEL_FLAGS = ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--block_size", "64"]


def tiny_model(work: Path, smoke: bool) -> Path:
    """The tiny preset's shape (smoke: smaller) after a few small steps of the real tokenizer/train.py and pipeline/pretrain.py:
    the load depends on the model's shape and reply length, not on how well it was trained."""
    from pipeline import pretrain

    text = common.corpus(smoke)
    tokenizer = common.train_tokenizer(work / "tokenizer", text=text)
    argv = ["--preset", "tiny", "--train_file", str(text), "--tokenizer_name_or_path", str(tokenizer), "--output_dir", str(work / "pretrain"),
            "--max_steps", "4" if smoke else "20", "--per_device_train_batch_size", "4" if smoke else "8", "--eval_strategy", "no",
            "--save_strategy", "no", "--sample_max_new_tokens", "8", *(SMOKE_MODEL_FLAGS if smoke else [])]
    with contextlib.redirect_stdout(sys.stderr):
        return pretrain.main(argv)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc (0 for one that has just exited)."""
    total = 0.0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            total += sum(rss_mb(int(child)) for child in children.read_text().split())
    return total


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else None


def ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(1000 * seconds)


class Load:
    """The clients' shared record: latencies, failures, each client's conversation, RSS samples."""

    def __init__(self, names: list[str], server_pid: int):
        self.server_pid = server_pid
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.conversations: dict[str, list[dict]] = {name: [] for name in names}
        self.first_round_left = len(names)
        self.rss_warm = 0.0  # set when the last client's first turn is done
        self.rss_samples: list[float] = []
        self.stop_sampling = threading.Event()

    def sample_rss(self) -> None:
        while not self.stop_sampling.wait(RSS_SAMPLE_SECONDS):
            self.rss_samples.append(rss_mb(self.server_pid))

    def first_round_finished(self) -> None:
        """Called once per client after its first turn: the last one marks the end of warm-up."""
        with self.lock:
            self.first_round_left -= 1
            if self.first_round_left == 0:
                self.rss_warm = rss_mb(self.server_pid)
                self.rss_samples.append(self.rss_warm)

    def converse(self, name: str, client, turns: int, max_new_tokens: int, start: threading.Barrier) -> None:
        start.wait()
        for turn in range(1, turns + 1):
            text = f"{name} turn {turn}"
            sent = time.perf_counter()
            try:
                reply = client.submit(text, max_new_tokens, 0.8, 50, 0.95, api_name="/chat").result(timeout=REPLY_TIMEOUT_SECONDS)
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported with its client
                with self.lock:
                    self.errors.append(f"{text}: {type(err).__name__}: {err}")
                if turn == 1:
                    self.first_round_finished()
                return  # the server's idea of this conversation is now unknown: later turns would prove nothing
            latency = time.perf_counter() - sent
            with self.lock:
                self.latencies.append(latency)
            self.conversations[name] += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
            if turn == 1:
                self.first_round_finished()


def cross_talk(prompts: list[dict], conversations: dict[str, list[dict]]) -> list[str]:
    """What went wrong between sessions, one line each: a turn's logged prompt missing, repeated, or not a
    suffix of its own client's conversation; a client with several sessions, or sharing one."""
    by_message: dict[str, list[dict]] = {}
    for prompt in prompts:
        by_message.setdefault(prompt["messages"][-1]["content"], []).append(prompt)
    problems, owner = [], {}
    for name, conversation in conversations.items():
        sessions = set()
        for end in range(1, len(conversation), 2):  # each answered turn: the conversation up to its user message
            text, seen = conversation[end - 1]["content"], conversation[:end]
            logged = by_message.get(text, [])
            if len(logged) != 1:
                problems.append(f"{text!r}: logged {len(logged)} times, expected once")
                continue
            messages = logged[0]["messages"]
            if messages != seen[-len(messages):]:
                problems.append(f"{text!r}: the model saw {messages}, not a suffix of {name}'s own conversation")
            sessions.add(logged[0]["session"])
        if len(sessions) > 1:
            problems.append(f"{name}: {len(sessions)} sessions, expected one")
        for session in sessions:
            if owner.setdefault(session, name) != name:
                problems.append(f"{name} and {owner[session]} share session {session[:8]}")
    return problems


def main() -> None:
    args = common.parser("app_load", __doc__)
    args.add_argument("--model", help="Model or run folder to serve; default: a tiny model trained first.")
    args.add_argument("--clients", type=int, default=16)
    args.add_argument("--turns", type=int, default=10, help="Turns per client, each in the same conversation.")
    args.add_argument("--concurrency", type=int, default=4, help="The app's --concurrency: replies generated at once.")
    args.add_argument("--max_new_tokens", type=int, default=32, help="Reply length every client asks for.")
    args.add_argument("--max_growth_mb", type=float, default=100.0, help="Most RSS growth from after warm-up to the end.")
    args = args.parse_args()
    if args.smoke:
        args.clients, args.turns, args.max_new_tokens = 3, 2, 8
    common.set_threads(args.threads)
    from gradio_client import Client

    work = Path(tempfile.mkdtemp(prefix="bench-app-load-"))
    model = args.model or tiny_model(work, args.smoke)
    names = [f"client{i:02d}" for i in range(args.clients)]
    app_flags = ["--concurrency", args.concurrency, "--max_new_tokens", args.max_new_tokens, "--max_turns", args.turns]
    with common.running_app(model, work / "app.log", *app_flags) as (url, process):
        load = Load(names, process.pid)
        clients = [Client(url, verbose=False, analytics_enabled=False) for _ in names]
        started = []
        start = threading.Barrier(len(names), action=lambda: started.append(time.perf_counter()))
        threads = [threading.Thread(target=load.converse, args=(name, client, args.turns, args.max_new_tokens, start))
                   for name, client in zip(names, clients)]
        sampler = threading.Thread(target=load.sample_rss, daemon=True)
        sampler.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started[0]
        load.stop_sampling.set()
        sampler.join()
        rss_end = rss_mb(process.pid)
        problems = cross_talk(common.logged_prompts(work / "app.log"), load.conversations)

    growth = rss_end - load.rss_warm
    bounded = growth <= args.max_growth_mb
    row = {"clients": args.clients, "turns": args.turns, "concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens,
           "replies": len(load.latencies), "errors": len(load.errors), "cross_talk": len(problems),
           "p50_ms": ms(percentile(load.latencies, 50)), "p95_ms": ms(percentile(load.latencies, 95)), "max_ms": ms(max(load.latencies, default=None)),
           "replies_per_s": round(len(load.latencies) / wall, 2),
           "rss_warm_MB": round(load.rss_warm), "rss_end_MB": round(rss_end), "rss_peak_MB": round(max(load.rss_samples + [rss_end])),
           "growth_MB": round(growth, 1), "memory_bounded": bounded}
    common.print_table(f"The app under load: {args.clients} clients x {args.turns} turns, concurrency {args.concurrency}", [row])
    common.write_results(args.output, "app_load", [row], args.smoke, model=str(model), app_log=str(work / "app.log"),
                         max_growth_mb=args.max_growth_mb, errors=load.errors[:20], cross_talk=problems[:20])

    failures = [f"{len(load.errors)} failed requests (first: {load.errors[0]})"] if load.errors else []
    failures += [f"{len(problems)} cross-talk problems (first: {problems[0]})"] if problems else []
    failures += [] if bounded else [f"memory grew {row['growth_MB']} MB after warm-up (limit {args.max_growth_mb:.0f} MB)"]
    if failures:
        sys.exit("app_load failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
