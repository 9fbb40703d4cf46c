"""Serving a chat model: what the CLI chat (pipeline/chat.py) and the Gradio app (app.py) share.

    model = ChatModel.load("runs/demo")                  # a run folder: its most aligned finished stage
    for piece in model.stream(messages, Sampling(temperature=0.7)):
        print(piece, end="", flush=True)

Loading is deliberately strict: safetensors weights only and never `trust_remote_code`, because the
app may be pointed at a Hub id chosen by someone else. Generation runs in a thread and streams text
through transformers' `TextIteratorStreamer`; when the reader stops listening (Ctrl-C, the app's stop
button, a closed browser tab) the generation thread is told to stop too, so no CPU is spent on a reply
nobody reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import StoppingCriteriaList, TextIteratorStreamer

from fluxchat import chat_format, evaluation, generation, loading, runs
from fluxchat.cli import fail

# Sane bounds for a public demo: a client's values outside are clamped, never passed to generate(); the chat's and
# the app's own flags outside them are refused (`Sampling.refuse_out_of_bounds`), not changed unsaid.
SAMPLING_BOUNDS = {
    "max_new_tokens": (1, 1024),
    "temperature": (0.0, 2.0),  # 0 = greedy
    "top_k": (0, 1000),  # 0 = no top-k filter
    "top_p": (0.05, 1.0),
}
# Below this size one token's matmuls are too small to split across cores: extra threads only add
# synchronisation (measured 2x-50x slower on 2 busy cores), and concurrent users each get a core instead.
SINGLE_THREAD_BELOW_PARAMETERS = 20_000_000
# A reply may use at most this share of the context, so a conversation always keeps room for history.
MAX_REPLY_SHARE = 0.5
STREAM_TIMEOUT_SECONDS = 300  # a generation thread silent this long is treated as dead


@dataclass
class Sampling:
    max_new_tokens: int = field(
        default=128, metadata={"help": "Longest reply in tokens, 1 to 1024 (at most half the model's context)."}
    )
    temperature: float = field(
        default=0.8,
        metadata={"help": "Sampling temperature, 0 to 2; 0 (or below 0.001) = greedy (always the likeliest token)."},
    )
    top_k: int = field(default=50, metadata={"help": "Sample among the k likeliest tokens, 0 to 1000; 0 = no limit."})
    top_p: float = field(
        default=0.95,
        metadata={"help": "Nucleus sampling, 0.05 to 1: the smallest set of tokens with this much probability."},
    )

    def refuse_out_of_bounds(self) -> None:
        """A command-line value outside SAMPLING_BOUNDS: one line (clamped, as a client's are, it would run
        unsaid as another value: --temperature 5 sampled at 2)."""
        for name, (low, high) in SAMPLING_BOUNDS.items():
            if not low <= getattr(self, name) <= high:
                fail(f"--{name} {getattr(self, name):g}: chat and the app take {low:g} to {high:g}")

    def clamped(self) -> Sampling:
        """The same settings pulled into SAMPLING_BOUNDS (the app never trusts what a client sends)."""
        values = {}
        for name, (low, high) in SAMPLING_BOUNDS.items():
            kind = int if name in ("max_new_tokens", "top_k") else float
            try:
                value = kind(getattr(self, name))
            except (TypeError, ValueError, OverflowError):  # junk, NaN or infinity as an int
                value = kind(getattr(Sampling, name))
            if value != value:  # NaN
                value = kind(getattr(Sampling, name))
            values[name] = min(max(value, low), high)
        return replace(self, **values)


def check_system_flag(system: str | None) -> None:
    """A `--system` of spaces only: refused, as generate refuses such a `--prompt` (it was sent as a system turn of
    spaces, which changed the replies; an empty one is no system message)."""
    if system and not system.strip():
        raise ValueError("--system is only whitespace: give an instruction, or leave it out")


@dataclass
class GenerationStats:
    """Timing of one reply: the numbers behind 'first-token latency' and 'tokens/s'."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_seconds: float | None = None  # from the call to the first generated token
    total_seconds: float = 0.0
    last_token: int | None = None
    ended_turn: bool = False  # the reply ended with an end-of-turn token, not cut at max_new_tokens (or stopped)

    @property
    def tokens_per_second(self) -> float | None:
        """Streaming rate after the first token (the first token's cost is the latency above)."""
        if self.first_token_seconds is None or self.new_tokens < 2:
            return None
        streaming = self.total_seconds - self.first_token_seconds
        return (self.new_tokens - 1) / streaming if streaming > 0 else None

    def summary(self) -> str:
        first = "-" if self.first_token_seconds is None else f"{self.first_token_seconds * 1000:.0f} ms"
        rate = self.tokens_per_second
        return (
            f"[{self.prompt_tokens} prompt + {self.new_tokens} new token{'' if self.new_tokens == 1 else 's'} | "
            f"first token {first} | "
            f"{'-' if rate is None else f'{rate:,.0f}'} tokens/s]"
        )


resolve_model = loading.resolve_model  # the one way every consumer finds a model


class Prompt(NamedTuple):
    """A conversation prepared once per request: the messages kept after trimming, their ids, the reply budget."""

    messages: list[dict]
    ids: list[int]
    budget: int


CHAT_HINT = "(the app takes a reward model as --reward_model)"


def load_model_and_tokenizer(source: str, reward: bool = False):
    """Tokenizer and model from `source` (see fluxchat/loading.py), plus the chat tokens a chat needs."""
    return loading.load_model_and_tokenizer(source, reward=reward, chat=True, hint=CHAT_HINT)


class _StopWhenAsked:
    """A stopping criterion the reading side can trigger: set the event and generation ends after this token."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _timed_streamer(tokenizer, stats: GenerationStats, start: float):
    class TimedStreamer(TextIteratorStreamer):
        """Counts generated tokens and stamps the first one (text is released a word at a time)."""

        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                return super().put(value)
            if stats.first_token_seconds is None:
                stats.first_token_seconds = time.perf_counter() - start
            stats.new_tokens += value.numel()
            if value.numel():
                stats.last_token = int(value.reshape(-1)[-1])
            if hidden is not None:  # as chat_format.decode_text: control tokens left out, <|unk|> shown
                value = value.reshape(-1)[~torch.isin(value.reshape(-1), hidden)]
            return super().put(value)

    hidden = chat_format.hidden_token_ids(tokenizer)
    if hidden is not None:
        hidden = torch.tensor(sorted(hidden), dtype=torch.long)
    return TimedStreamer(
        tokenizer, skip_prompt=True, timeout=STREAM_TIMEOUT_SECONDS, skip_special_tokens=hidden is None
    )


def empty_reply_note(stats: GenerationStats) -> str:
    """What the chat and the app say when a reply holds no text (only control tokens, or only spaces)."""
    how = "ended its turn before writing anything" if stats.ended_turn else "wrote no text (only control tokens)"
    return f"(the reply is empty: the model {how})"


class ChatModel:
    """A causal LM with its tokenizer, rendering conversations through fluxchat.chat_format."""

    def __init__(self, model, tokenizer, source: str = ""):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        config = model.config
        self.context_length = loading.context_length(config)
        self.stop_ids = chat_format.stop_token_ids(tokenizer)

    @classmethod
    def load(cls, value: str | None) -> ChatModel:
        source = resolve_model(value)
        model, tokenizer = load_model_and_tokenizer(source)
        chat_model = cls(model, tokenizer, source)
        chat_model.warm_up()
        return chat_model

    def warm_up(self) -> None:
        """Pick the thread count and run one tiny generation, so the first user doesn't pay for either."""
        if sum(p.numel() for p in self.model.parameters()) < SINGLE_THREAD_BELOW_PARAMETERS:
            torch.set_num_threads(1)
        self.reply([{"role": "user", "content": "hi"}], Sampling(max_new_tokens=2, temperature=0))

    def reply_budget(self, max_new_tokens: int) -> int:
        return max(1, min(int(max_new_tokens), int(self.context_length * MAX_REPLY_SHARE)))

    def check_system(self, system: str | None, max_new_tokens: int) -> None:
        """Refuse, at start, a --system message that leaves no room for a user message and a reply: otherwise
        every message would fail with an error that blames the message."""
        if not system:
            return
        budget = self.reply_budget(max_new_tokens)
        start = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
        if chat_format.trim_to_context(self.tokenizer, start, self.context_length, budget, required=False) is None:
            size = len(chat_format.render_prompt(self.tokenizer, start[:1]))
            if size >= self.context_length:  # no reply length makes room: "or lower --max_new_tokens" misled
                fail(
                    f"--system is {size} tokens, longer than the model's context of {self.context_length}: shorten it"
                )
            fail(
                f"--system is {size} tokens: with a {budget}-token reply it leaves no room for a message in the "
                f"model's context of {self.context_length}; shorten it or lower --max_new_tokens"
            )

    def prepare(self, messages: list[dict], max_new_tokens: int) -> Prompt:
        """Trim to the context and render, once: pass the result to `stream`. UsageError if the newest turn cannot fit."""
        budget = self.reply_budget(max_new_tokens)
        kept, ids = chat_format.trim_to_context(self.tokenizer, messages, self.context_length, budget, with_ids=True)
        return Prompt(kept, ids, budget)

    def stream(
        self, prompt: Prompt | list[dict], sampling: Sampling, stats: GenerationStats | None = None
    ) -> Iterator[str]:
        """Yield the next assistant reply piece by piece, for a prepared Prompt (or messages, prepared here).
        Raises UsageError if the newest message cannot fit."""

        start = time.perf_counter()
        sampling = sampling.clamped()
        stats = stats if stats is not None else GenerationStats()
        if not isinstance(prompt, Prompt):
            prompt = self.prepare(prompt, sampling.max_new_tokens)
        prompt_ids, budget = prompt.ids, prompt.budget
        stats.prompt_tokens = len(prompt_ids)
        streamer = _timed_streamer(self.tokenizer, stats, start)
        stop = threading.Event()
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt_ids], device=device)
        failures: list[BaseException] = []

        def generate():
            try:
                with torch.inference_mode():
                    self.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=generation.generation_config(
                            self.tokenizer, budget, sampling.temperature, sampling.top_k, sampling.top_p
                        ),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopWhenAsked(stop)]),
                    )
            except BaseException as err:  # re-raised in the reading thread, which would otherwise wait forever
                failures.append(err)
                streamer.end()

        worker = threading.Thread(target=generate, name="fluxchat-generate", daemon=True)
        worker.start()
        lead = chat_format.format_of(self.tokenizer).lead  # generated before the reply's text: not part of it
        try:
            for piece in streamer:
                if lead and piece:
                    piece, lead = piece.removeprefix(lead), ""
                if piece:
                    yield piece
        finally:
            stop.set()  # the reader is gone or done: don't keep generating for nobody
            worker.join()
            stats.total_seconds = time.perf_counter() - start
        if failures:
            raise failures[0]
        stats.ended_turn = stats.last_token in self.stop_ids

    def reply(self, messages: list[dict], sampling: Sampling, stats: GenerationStats | None = None) -> str:
        return "".join(self.stream(messages, sampling, stats))


class RewardScorer:
    """A reward model (AutoModelForSequenceClassification, one label): score = its logit on the conversation."""

    def __init__(self, source: str):
        run_reward = Path(source) / "reward"
        self.source = str(run_reward) if runs.is_finished(run_reward) else source  # a run folder: its reward stage
        self.model, self.tokenizer = load_model_and_tokenizer(self.source, reward=True)

    def score(self, *conversations: list[dict]) -> list[float]:
        """Each conversation's score, scored as every stage scores them (one batch)."""
        return evaluation.score_conversations(self.model, self.tokenizer, list(conversations))
