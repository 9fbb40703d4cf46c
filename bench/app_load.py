"""The app under load: many gradio_client users at once, each in its own session, several turns each.

    python bench/app_load.py                                    # 16 clients x 10 turns on a tiny model it trains first
    python bench/app_load.py --model runs/demo/ppo --clients 32 --turns 5 --concurrency 8
    python bench/app_load.py --smoke                            # 3 clients x 2 turns
    python bench/app_load.py --hostile --clients 8 --turns 4    # 8 clients, alone and then beside 4 hostile ones
    python bench/app_load.py --fresh_sessions 20 --message_chars 5242880   # the memory each fresh session holds

Starts the real app as a user would (`python app.py --model ... --log_level debug`), releases all clients
at once (a barrier) and times every reply from the request to the final text. It passes (exit code 0)
only if (issue 7):
- no request failed;
- no cross-talk: from the app's debug log of prompts, the prompt the model saw for each client's turn is a
  suffix (the app drops the oldest turns to fit the context) of that client's own conversation, its
  messages and the replies it received, and each client has exactly one session, its own;
- memory is bounded: the app's RSS (process and children, sampled from /proc) grows at most
  --max_growth_mb from the end of the first round of turns (every client answered once) to the end.
--hostile (issue 12): the same normal clients run twice on one app, first alone, then while --hostile_clients
clients keep sending what a hostile client can: a forged history of the largest size the issue saw (19 user
turns, 150 'assistant' messages, 2.9 MB) through ChatInterface's own events, the largest history the app
accepts (max_turns - 1 turns of the longest message and reply), and 5 MB uploads. It reports the normal
clients' p95 both ways and passes only if the p95 with hostile clients is at most --max_p95_ratio times the p95
without, no normal request failed, every forged history and upload was refused, and memory stayed bounded.
--fresh_sessions N: N chat requests of a --message_chars long message, each from a new session (what Gradio keeps
per session: ChatInterface saves a message before the app can refuse it): the app's RSS before and after, and how
each request was answered (413 for a body past the app's bound, else the app's "too long" message).
Without --model it first trains a tiny model (our tokenizer and a few pretraining steps on tinyshakespeare,
offline): the tiny preset's shape, whose nonsense replies never end early, so every reply is
--max_new_tokens long (the worst case for that length). --threads sets torch's threads for that training
only; the app picks its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import common
import httpx

from fluxchat.cli import run_cli

REPLY_TIMEOUT_SECONDS = 300
UPLOAD_BYTES = 5 << 20  # what the issue stored and got served back
MAX_MESSAGE_CHARS, MAX_TURNS = 2000, 20  # the app's defaults, passed explicitly so the hostile sizes match them
RSS_SAMPLE_SECONDS = 0.2
SMOKE_MODEL_FLAGS = ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--block_size", "64"]


def tiny_model(work: Path, smoke: bool) -> Path:
    """The tiny preset's shape (smoke: smaller) after a few small steps of the real tokenizer/train.py and pipeline/pretrain.py:
    the load depends on the model's shape and reply length, not on how well it was trained."""
    from pipeline import pretrain

    text = common.corpus(smoke)
    tokenizer = common.train_tokenizer(work / "tokenizer", text=text)
    argv = [
        "--preset",
        "tiny",
        "--train_file",
        str(text),
        "--tokenizer_name_or_path",
        str(tokenizer),
        "--output_dir",
        str(work / "pretrain"),
        "--max_steps",
        "4" if smoke else "20",
        "--per_device_train_batch_size",
        "4" if smoke else "8",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--sample_max_new_tokens",
        "8",
        *(SMOKE_MODEL_FLAGS if smoke else []),
    ]
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
                reply = client.submit(text, max_new_tokens, 0.8, 50, 0.95, api_name="/chat").result(
                    timeout=REPLY_TIMEOUT_SECONDS
                )
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


class Hostile:
    """A client that speaks Gradio's wire protocol itself, as an attacker would: it sets its session's chat
    history through ChatInterface's own state-synchronising event (the history is client data), then asks
    for a reply through the queue; and it uploads files nobody asked for."""

    def __init__(self, url: str, context_tokens: int):
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=REPLY_TIMEOUT_SECONDS)
        config = self.http.get(f"{self.url}/config").json()
        kinds = {c["id"]: c.get("type") for c in config["components"]}
        deps = config["dependencies"]
        self.chat_index = next(i for i, d in enumerate(deps) if d.get("api_name") == "chat")
        chatbot = next(c for c, kind in kinds.items() if kind == "chatbot")
        # lambda x: (x, x) from the Chatbot into the session's chatbot state: the route a browser's history takes
        self.sync_index = next(
            i
            for i, d in enumerate(deps)
            if d["inputs"] == [chatbot]
            and len(d["outputs"]) == 2
            and all(kinds.get(o) == "state" for o in d["outputs"][:1])
        )
        reply_chars = 16 * context_tokens  # app.REPLY_CHARS_PER_TOKEN

        def message(role: str, text: str) -> dict:
            return {"role": role, "content": [{"type": "text", "text": text}]}  # as the browser's Chatbot sends it

        self.histories = {
            "forged": [message("user", f"turn {i}") for i in range(19)]
            + [message("assistant", "x" * 19_000) for _ in range(150)],
            "largest accepted": [
                m
                for i in range(MAX_TURNS - 1)
                for m in (
                    message("user", f"w{i} " * (MAX_MESSAGE_CHARS // 4)),
                    message("assistant", "y " * (reply_chars // 2)),
                )
            ],
        }
        self.refused = {"forged": 0, "largest accepted": 0, "upload": 0}
        self.answered = {"forged": 0, "largest accepted": 0, "upload": 0}
        self.errors: list[str] = []

    def ask(self, kind: str) -> None:
        session = uuid.uuid4().hex[:11]
        body = {
            "data": [self.histories[kind]],
            "fn_index": self.sync_index,
            "session_hash": session,
            "event_data": None,
            "trigger_id": None,
        }
        response = self.http.post(f"{self.url}/gradio_api/run/predict", json=body)
        if response.status_code == 413:  # longer than any request the app can need: refused before Gradio read it
            self.refused[kind] += 1
            return
        response.raise_for_status()
        body = {
            "data": ["hello", None, 32, 0.8, 50, 0.95],
            "fn_index": self.chat_index,
            "session_hash": session,
            "event_data": None,
            "trigger_id": None,
        }
        self.http.post(f"{self.url}/gradio_api/queue/join", json=body).raise_for_status()
        with self.http.stream("GET", f"{self.url}/gradio_api/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("msg") == "process_completed":
                    ok = event.get("success", False)
                    (self.answered if ok else self.refused)[kind] += 1
                    return

    def upload(self) -> None:
        response = self.http.post(
            f"{self.url}/gradio_api/upload", files={"files": ("page.html", b"<html>" + b"\0" * UPLOAD_BYTES)}
        )
        (self.refused if response.status_code == 413 else self.answered)["upload"] += 1

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for action in (lambda: self.ask("forged"), lambda: self.ask("largest accepted"), self.upload):
                try:
                    action()
                except Exception as err:  # noqa: BLE001 - counted: a hostile request may fail any way
                    self.errors.append(f"{type(err).__name__}: {err}"[:200])
                if stop.is_set():
                    return


def run_clients(
    url: str, process, names: list[str], turns: int, max_new_tokens: int, hostile: list[Hostile]
) -> tuple[Load, float]:
    """The normal clients' conversations, all released at once, with the hostile clients running meanwhile."""
    from gradio_client import Client

    load = Load(names, process.pid)
    clients = [Client(url, verbose=False, analytics_enabled=False) for _ in names]
    started = []
    start = threading.Barrier(len(names), action=lambda: started.append(time.perf_counter()))
    threads = [
        threading.Thread(target=load.converse, args=(name, client, turns, max_new_tokens, start))
        for name, client in zip(names, clients)
    ]
    stop = threading.Event()
    attackers = [threading.Thread(target=h.run, args=(stop,), daemon=True) for h in hostile]
    sampler = threading.Thread(target=load.sample_rss, daemon=True)
    sampler.start()
    for thread in attackers + threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started[0]
    stop.set()
    for thread in attackers:
        thread.join(timeout=REPLY_TIMEOUT_SECONDS)
    load.stop_sampling.set()
    sampler.join()
    return load, wall


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
            if messages != seen[-len(messages) :]:
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
    args.add_argument(
        "--max_growth_mb", type=float, default=100.0, help="Most RSS growth from after warm-up to the end."
    )
    args.add_argument(
        "--hostile",
        action="store_true",
        help="Run the clients alone, then beside --hostile_clients hostile ones (see above).",
    )
    args.add_argument("--hostile_clients", type=int, default=4)
    args.add_argument(
        "--max_p95_ratio", type=float, default=2.0, help="--hostile: most p95 with hostile clients / p95 without."
    )
    args.add_argument("--fresh_sessions", type=int, default=0, help="Measure session memory instead (see above).")
    args.add_argument("--message_chars", type=int, default=5 << 20, help="--fresh_sessions: each message's length.")
    args = args.parse_args()
    if args.smoke:
        args.clients, args.turns, args.max_new_tokens = 3, 2, 8
    common.set_threads(args.threads)
    from gradio_client import Client

    work = Path(tempfile.mkdtemp(prefix="bench-app-load-"))
    model = args.model or tiny_model(work, args.smoke)
    if args.hostile:
        return hostile_main(args, model, work)
    if args.fresh_sessions:
        return fresh_sessions_main(args, model, work)
    names = [f"client{i:02d}" for i in range(args.clients)]
    app_flags = ["--concurrency", args.concurrency, "--max_new_tokens", args.max_new_tokens, "--max_turns", args.turns]
    with common.running_app(model, work / "app.log", *app_flags) as (url, process):
        load = Load(names, process.pid)
        clients = [Client(url, verbose=False, analytics_enabled=False) for _ in names]
        started = []
        start = threading.Barrier(len(names), action=lambda: started.append(time.perf_counter()))
        threads = [
            threading.Thread(target=load.converse, args=(name, client, args.turns, args.max_new_tokens, start))
            for name, client in zip(names, clients)
        ]
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
    row = {
        "clients": args.clients,
        "turns": args.turns,
        "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens,
        "replies": len(load.latencies),
        "errors": len(load.errors),
        "cross_talk": len(problems),
        "p50_ms": ms(percentile(load.latencies, 50)),
        "p95_ms": ms(percentile(load.latencies, 95)),
        "max_ms": ms(max(load.latencies, default=None)),
        "replies_per_s": round(len(load.latencies) / wall, 2),
        "rss_warm_MB": round(load.rss_warm),
        "rss_end_MB": round(rss_end),
        "rss_peak_MB": round(max(load.rss_samples + [rss_end])),
        "growth_MB": round(growth, 1),
        "memory_bounded": bounded,
    }
    common.print_table(
        f"The app under load: {args.clients} clients x {args.turns} turns, concurrency {args.concurrency}", [row]
    )
    common.write_results(
        args.output,
        "app_load",
        [row],
        args.smoke,
        model=str(model),
        app_log=str(work / "app.log"),
        max_growth_mb=args.max_growth_mb,
        errors=load.errors[:20],
        cross_talk=problems[:20],
    )

    failures = [f"{len(load.errors)} failed requests (first: {load.errors[0]})"] if load.errors else []
    failures += [f"{len(problems)} cross-talk problems (first: {problems[0]})"] if problems else []
    failures += (
        [] if bounded else [f"memory grew {row['growth_MB']} MB after warm-up (limit {args.max_growth_mb:.0f} MB)"]
    )
    if failures:
        sys.exit("app_load failed: " + "; ".join(failures))


def fresh_sessions_main(args, model: Path, work: Path) -> None:
    """The app's RSS before and after --fresh_sessions requests of one long message, each from a new session."""
    from gradio_client import Client

    answers: dict[str, int] = {}
    with common.running_app(model, work / "app.log") as (url, process):
        time.sleep(2)  # settled after start-up
        before = rss_mb(process.pid)
        for _ in range(args.fresh_sessions):
            try:
                Client(url, verbose=False, analytics_enabled=False).predict(
                    "x" * args.message_chars, 16, 0.0, 0, 1.0, api_name="/chat"
                )
                answer = "answered"
            except Exception as err:  # noqa: BLE001 - counted: each is refused one way or another
                answer = "413" if "413" in str(err) else str(err).splitlines()[0][:60]
            answers[answer] = answers.get(answer, 0) + 1
        after = rss_mb(process.pid)
    row = {
        "requests": args.fresh_sessions,
        "message_chars": args.message_chars,
        "answers": answers,
        "rss_before_MB": round(before),
        "rss_after_MB": round(after),
        "MB_per_session": round((after - before) / args.fresh_sessions, 2),
    }
    common.print_table(f"{args.fresh_sessions} requests of {args.message_chars:,} characters, a session each", [row])
    name = f"app_sessions_{args.message_chars}"  # one file per message size, beside app_load.json
    output = args.output.with_name(f"{name}.json") if args.output.name == "app_load.json" else args.output
    common.write_results(output, "app_sessions", [row], args.smoke, model=str(model))


def hostile_main(args, model: Path, work: Path) -> None:
    """The same normal clients alone, then beside hostile ones, on one app: p95 both ways, errors, memory."""
    from fluxchat import loading

    context = loading.context_length(loading.load_config(str(loading.resolve_model(str(model)))))
    app_flags = [
        "--concurrency",
        args.concurrency,
        "--max_new_tokens",
        args.max_new_tokens,
        "--max_turns",
        MAX_TURNS,
        "--max_message_chars",
        MAX_MESSAGE_CHARS,
    ]
    rows, hostile = [], []
    with common.running_app(model, work / "app.log", *app_flags) as (url, process):
        for phase in ("alone", "with hostile"):
            hostile = [Hostile(url, context) for _ in range(args.hostile_clients)] if phase != "alone" else []
            names = [f"{'h' if hostile else 'a'}client{i:02d}" for i in range(args.clients)]
            since = (work / "app.log").stat().st_size
            load, wall = run_clients(url, process, names, args.turns, args.max_new_tokens, hostile)
            problems = cross_talk(
                [p for p in common.logged_prompts(work / "app.log", since) if p["messages"][-1]["content"] != "hello"],
                load.conversations,
            )
            rows.append(
                {
                    "phase": phase,
                    "clients": args.clients,
                    "hostile_clients": len(hostile),
                    "replies": len(load.latencies),
                    "errors": len(load.errors),
                    "cross_talk": len(problems),
                    "p50_ms": ms(percentile(load.latencies, 50)),
                    "p95_ms": ms(percentile(load.latencies, 95)),
                    "max_ms": ms(max(load.latencies, default=None)),
                    "forged_refused": sum(h.refused["forged"] for h in hostile),
                    "forged_answered": sum(h.answered["forged"] for h in hostile),
                    "largest_accepted_answered": sum(h.answered["largest accepted"] for h in hostile),
                    "uploads_refused": sum(h.refused["upload"] for h in hostile),
                    "uploads_stored": sum(h.answered["upload"] for h in hostile),
                    "hostile_errors": sum(len(h.errors) for h in hostile),
                    "rss_peak_MB": round(max(load.rss_samples + [rss_mb(process.pid)])),
                    "wall_s": round(wall, 1),
                    "errors_first": load.errors[:3],
                    "hostile_errors_first": [e for h in hostile for e in h.errors][:3],
                }
            )
    alone, attacked = rows
    ratio = attacked["p95_ms"] / max(alone["p95_ms"], 1)
    common.print_table(
        f"The app with {args.hostile_clients} hostile clients: {args.clients} normal clients x {args.turns} turns",
        [{k: v for k, v in r.items() if not k.endswith("_first")} for r in rows],
    )
    print(f"p95 with hostile clients / alone: {ratio:.2f} (limit {args.max_p95_ratio})")
    output = args.output.with_name("app_load_hostile.json") if args.output.name == "app_load.json" else args.output
    common.write_results(
        output,
        "app_load_hostile",
        rows,
        args.smoke,
        model=str(model),
        app_log=str(work / "app.log"),
        p95_ratio=round(ratio, 2),
    )
    failures = [f"p95 ratio {ratio:.2f} > {args.max_p95_ratio}"] if ratio > args.max_p95_ratio else []
    failures += [
        f"{r['phase']}: {r['errors']} failed normal requests ({r['errors_first']})" for r in rows if r["errors"]
    ]
    failures += [f"{r['phase']}: {r['cross_talk']} cross-talk problems" for r in rows if r["cross_talk"]]
    failures += [f"{attacked['forged_answered']} forged histories answered"] if attacked["forged_answered"] else []
    failures += [f"{attacked['uploads_stored']} uploads stored"] if attacked["uploads_stored"] else []
    growth = attacked["rss_peak_MB"] - alone["rss_peak_MB"]
    failures += (
        [f"memory grew {growth} MB with hostile clients (limit {args.max_growth_mb:.0f})"]
        if growth > args.max_growth_mb
        else []
    )
    if failures:
        sys.exit("app_load --hostile failed: " + "; ".join(failures))


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
