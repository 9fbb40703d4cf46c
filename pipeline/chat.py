"""Chat with a model in the terminal: multi-turn, streamed, with the conversation trimmed to the context.

    python pipeline/chat.py runs/demo                       # a run folder: its ppo > grpo > dpo > sft > pretrain stage
    python pipeline/chat.py runs/demo/sft --temperature 0.7 --top_p 0.9 --system "You are terse."
    python pipeline/chat.py someone/fluxchat-tiny --max_new_tokens 64   # a Hub id (safetensors only)
    printf 'hello\\nwhat is 2+2?\\n' | python pipeline/chat.py runs/demo --seed 1   # piped: a reply per message
    echo hello | python pipeline/chat.py runs/demo --show_stats                     # first-token latency, tokens/s

Commands: /reset (start over, keeping --system), /history (the conversation the model sees), /quit.
Piped, stdout holds only the replies, one line each: every non-blank line that is not one of those commands is a
message (typed, an unknown /word is a typo to refuse; piped, "/2+2" is a message), a reply's own line breaks and
backslashes are written as \\n, \\r and \\\\, and a message refused (too long for the context) gets an empty
line, its reason on stderr: the n-th line is the n-th message's reply. Control characters a model emits (an escape
sequence would drive the terminal) are shown as \\xNN in both modes. Ctrl-C stops a reply mid-stream. When the
conversation no longer fits the model's context, the oldest whole turns are dropped (the system message stays); a
note says so.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxchat import chat_format
from fluxchat.cli import UsageError, run_cli, terminal_output
from fluxchat.config import parse_config
from fluxchat.serving import ChatModel, GenerationStats, Sampling, check_system_flag, empty_reply_note

COMMANDS = "/reset /history /quit"


@dataclass
class ChatArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Model folder, run folder (runs/<name>: its ppo > grpo > dpo > sft > pretrain stage) or Hub id; may also be the first argument. Default: the most recently finished run."
        },
    )
    system: str | None = field(
        default=None, metadata={"help": "System message that opens every conversation and is never trimmed."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed: the same seed and inputs give the same replies."})
    show_stats: bool = field(
        default=False,
        metadata={"help": "After each reply, print prompt/new tokens, first-token latency and tokens/s to stderr."},
    )

    def __post_init__(self):
        check_system_flag(self.system)


def show_history(messages: list[dict], out) -> None:
    if not messages:
        print("(no messages yet)", file=out)
    for message in messages:
        print(f"{message['role']}: {shown(message['content'], interactive=True)}", file=out)


_PIPED = {**chat_format.CONTROL_ESCAPES, ord("\\"): "\\\\", 0x0A: "\\n", 0x0D: "\\r"}


def shown(piece: str, interactive: bool) -> str:
    """A piece of a reply as written to stdout: controls visible; piped, on one line and reversible."""
    return chat_format.visible_text(piece) if interactive else piece.translate(_PIPED)


def read_message(interactive: bool) -> str | None:
    """The next line typed or piped; None at the end of input. Piped, stdin is read directly: input() would flush
    stdout first, and a stdout that cannot be written (closed, a full disk) would fail before the message is read."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def converse(model: ChatModel, sampling: Sampling, start: list[dict], interactive: bool, show_stats: bool) -> None:
    """The conversation loop: a message in, a streamed reply out, until /quit or the end of input."""
    info = sys.stdout if interactive else sys.stderr  # piped, stdout carries only the replies
    messages = list(start)
    while True:
        line = read_message(interactive)
        if line is None:
            break
        # A lone surrogate (argv-style surrogateescape input) made safe; a byte-order mark (a file saved by a Windows
        # editor) dropped, else a first-line /quit was sent to the model as "\ufeff/quit" and answered.
        text = chat_format.clean_text(line).lstrip("\ufeff").strip()
        if not text:
            continue
        if text.split()[0] in ("/quit", "/reset", "/history") and " " in text:  # `/reset now` reached the model
            print(f"{text.split()[0]} takes no argument; commands: {COMMANDS}", file=info)
            continue
        if text == "/quit":
            break
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=info)
            continue
        if text == "/history":
            show_history(messages, info)
            continue
        if interactive and text.startswith("/") and " " not in text:
            print(f"unknown command {text}; commands: {COMMANDS}", file=info)
            continue

        candidate = messages + [{"role": "user", "content": text}]
        try:
            prompt = model.prepare(candidate, sampling.max_new_tokens)  # trimmed and rendered once
        except UsageError as err:
            print(f"error: {err}", file=info)
            if not interactive:
                # Its reply, empty: the replies that follow stay paired with their messages.
                print(flush=True)
            continue
        if len(prompt.messages) < len(candidate):
            print(
                f"(dropped the {len(candidate) - len(prompt.messages)} oldest messages to fit the context)",
                file=info,
            )
        messages = prompt.messages
        stats = GenerationStats()
        pieces: list[str] = []
        if interactive:
            print("bot> ", end="", flush=True)
        try:
            for piece in model.stream(prompt, sampling, stats):
                pieces.append(piece)
                print(shown(piece, interactive), end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print(flush=True)
        if not "".join(pieces).strip():  # else an empty line, which reads like a hang or a lost reply
            print(empty_reply_note(stats), file=info)
        messages.append({"role": "assistant", "content": "".join(pieces)})
        if show_stats:
            print(stats.summary(), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> Path:
    args, sampling, _ = parse_config("chat", (ChatArguments, Sampling), argv, positional="model")
    sampling.refuse_out_of_bounds()
    model = ChatModel.load(args.model)
    system = chat_format.clean_text(args.system) if args.system else None
    model.check_system(system, sampling.max_new_tokens)  # else every message would fail, blaming the message
    torch.manual_seed(args.seed)
    # Invalid UTF-8 on stdin (a pipe from anything) becomes U+FFFD rather than ending the conversation.
    if isinstance(sys.stdin, io.TextIOWrapper):  # not a test's StringIO
        sys.stdin.reconfigure(errors="replace")
    interactive = sys.stdin.isatty()
    # Piped use: stdout carries only the replies, so it can be read by another program.
    info = sys.stdout if interactive else sys.stderr
    # The reply's cap said up front: --max_new_tokens beyond half the context is lowered to leave room for the talk.
    budget = model.reply_budget(sampling.max_new_tokens)
    print(
        f"fluxchat: {model.source} (context {model.context_length} tokens, replies up to {budget}). Commands: {COMMANDS}",
        file=info,
    )
    start = [{"role": "system", "content": system}] if system else []

    with terminal_output():
        converse(model, sampling, start, interactive, args.show_stats)
    return Path(model.source)


if __name__ == "__main__":
    run_cli(main)
