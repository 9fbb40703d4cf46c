"""fluxchat's Gradio app: chat with a trained model, or compare any two stages side by side (a Space's entry point).

    python app.py --model runs/demo/ppo                                  # http://127.0.0.1:7860
    python app.py --model runs/demo                                      # a run folder: its ppo > grpo > dpo > sft > pretrain stage
                                                                         # Compare tab: pick any two of its finished stages
    python app.py --model runs/demo/ppo --compare_model runs/demo/sft --reward_model runs/demo/reward
    python app.py --model runs/demo/ppo --host 0.0.0.0 --auth me:secret  # reachable from the network, behind a login
    python app.py --model runs/demo/ppo --compare_model runs/demo/sft --collect_feedback   # A/B/tie -> runs/demo/feedback.jsonl
    FLUXCHAT_MODEL=you/fluxchat-ppo FLUXCHAT_COMPARE_MODEL=you/fluxchat-sft python app.py   # a Space: models from the Hub

Without --model (and FLUXCHAT_MODEL) it serves the newest finished run under runs/. When the served model is a
stage of a run folder (runs/<name>/<stage>), the Compare tab's "A" and "B" lists hold every finished chat stage
of that run (plus --compare_model when it lies elsewhere): A starts as the served stage, B as --compare_model,
else sft, else the next finished stage. A stage is loaded when first picked and then kept (one per listed
choice, the served model shared with the Chat tab); a choice that is not listed is refused. Everything a public
demo needs is enforced here on the server, whatever a client sends: message length, turns per
conversation, the history the client sends (message count and length, checked before anything is
tokenized), sampling values (clamped), no uploads, internal errors kept out of the browser, a queue that
serves several users at once, safetensors-only loading without remote code. `--log_level debug` logs every prompt the model sees (as JSON), which is
how the tests check that the browser's history reaches the model and that sessions never mix.
"""

import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# gradio reads GRADIO_SERVER_PORT with int() as it is imported: a value that is no number ended in its traceback.
_PORT_ENV = os.environ.get("GRADIO_SERVER_PORT")
if _PORT_ENV is not None and not _PORT_ENV.strip().isdigit():
    print(
        f"error: GRADIO_SERVER_PORT={_PORT_ENV[:60]!r} is not a port number: unset it, or give 1-65535",
        file=sys.stderr,
    )
    sys.exit(2)

# ruff: noqa: E402 (the imports below come after the check above)
import gradio as gr
from starlette.middleware import Middleware

from fluxchat import chat_format, feedback, runs
from fluxchat.cli import UsageError, fail, run_cli
from fluxchat.config import parse_config
from fluxchat.serving import (
    SAMPLING_BOUNDS,
    ChatModel,
    GenerationStats,
    RewardScorer,
    Sampling,
    check_system_flag,
    empty_reply_note,
    resolve_model,
)

logger = logging.getLogger("fluxchat.app")
# The app takes no files, but Gradio's upload route is open to any client: 0 is the smallest limit it accepts
# (any upload with content is refused with 413).
MAX_UPLOAD_BYTES = 0
# The longest reply the app can have produced, in characters per token of context: a forged "reply" longer than
# this never came from the model. Generous: a token of our byte-level BPE is a few characters.
REPLY_CHARS_PER_TOKEN = 16
MAX_FEEDBACK_MB = 1_000_000  # 1 TB of choices, far past any real file (1e303 overflowed the byte count)
INTERNAL_ERROR = "Something went wrong while answering: please try again (the details are in the server log)."
NOTHING_TO_RATE = "Nothing to rate: press Compare first (each comparison is rated once)."
# Comparisons rated lately, remembered to refuse a second choice for one: only clicks handled at the same time
# can carry a rated comparison (once one is recorded the session's state is emptied), so a few thousand suffice.
RATED_REMEMBERED = 4096


@dataclass
class AppArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Model folder, run folder or Hub id (env FLUXCHAT_MODEL); default: the newest run under runs/."
        },
    )
    compare_model: str | None = field(
        default=None,
        metadata={"help": "Second model for the Compare tab, e.g. runs/demo/sft (env FLUXCHAT_COMPARE_MODEL)."},
    )
    reward_model: str | None = field(
        default=None,
        metadata={
            "help": "Reward model that scores each Compare reply, e.g. runs/demo/reward (env FLUXCHAT_REWARD_MODEL)."
        },
    )
    system: str | None = field(default=None, metadata={"help": "System message that opens every conversation."})
    host: str | None = field(
        default=None,
        metadata={"help": "Address to bind; default 127.0.0.1 (on a Space: $GRADIO_SERVER_NAME or 0.0.0.0)."},
    )
    port: int | None = field(
        default=None, metadata={"help": "Port to listen on; default $GRADIO_SERVER_PORT or 7860."}
    )
    share: bool = field(default=False, metadata={"help": "Also open a public gradio.live link."})
    auth: str | None = field(
        default=None, metadata={"help": "user:password required to use the app (env FLUXCHAT_AUTH)."}
    )
    max_message_chars: int = field(default=2000, metadata={"help": "Longest accepted user message, in characters."})
    max_turns: int = field(default=20, metadata={"help": "User messages per conversation before it must be cleared."})
    concurrency: int = field(
        default=4, metadata={"help": "Replies generated at the same time; more users wait in the queue."}
    )
    queue_size: int = field(
        default=64, metadata={"help": "Requests waiting at most; more are turned away with a 'queue full' message."}
    )
    # Gradio keeps each session's state (a conversation's history, the comparison to rate) in memory, 10,000
    # sessions by default. With request bodies bounded (RequestSizeLimit) a session holds at most ~3 MB on the tiny
    # preset (a client sending the largest request the app accepts, from a fresh session each time, measured: 20
    # requests of 900 kB, +57 MB), so this bounds what such a client can make the server hold.
    max_sessions: int = field(
        default=500,
        metadata={
            "help": "Sessions whose state the server keeps; the least recently used is dropped first (the model "
            "no longer sees that conversation's earlier turns). Bounds the memory a client opening many sessions takes."
        },
    )
    log_level: str = field(
        default="info",
        metadata={"help": "info: one line per reply; debug: also every prompt the model sees, as JSON."},
    )
    collect_feedback: bool = field(
        default=False,
        metadata={
            "help": "Compare tab: 'A is better / B is better / Tie' buttons; each choice is one line in --feedback_file (pipeline/reward.py and dpo.py read it with --dataset)."
        },
    )
    feedback_file: str | None = field(
        default=None,
        metadata={
            "help": "Where choices are appended (JSONL); default feedback.jsonl in the served model's run folder."
        },
    )
    feedback_max_mb: float = field(
        default=50.0,
        metadata={"help": "Largest size of the feedback file; past it choices are refused with a message."},
    )

    def __post_init__(self):
        # An error names where the value came from: the environment's, with no flag given, blamed a flag.
        self.model_from = "model" if self.model else "FLUXCHAT_MODEL"
        self.compare_model_from = "compare_model" if self.compare_model else "FLUXCHAT_COMPARE_MODEL"
        self.model = self.model or os.environ.get("FLUXCHAT_MODEL")
        self.compare_model = self.compare_model or os.environ.get("FLUXCHAT_COMPARE_MODEL")
        self.reward_model = self.reward_model or os.environ.get("FLUXCHAT_REWARD_MODEL")
        check_system_flag(self.system)
        auth_from = "--auth" if self.auth is not None else "FLUXCHAT_AUTH"
        self.auth = self.auth if self.auth is not None else os.environ.get("FLUXCHAT_AUTH")
        if self.auth is not None and not self.auth.strip():  # else it reads as unset: the app would open to anyone
            raise ValueError(f"{auth_from} is empty: give user:password (or leave it out to serve without a login)")
        if self.auth is not None and (
            ":" not in self.auth or not all(part.strip() for part in self.auth.split(":", 1))
        ):
            raise ValueError(f"{auth_from} must look like user:password (neither of them blank)")
        port_from = "--port" if self.port is not None else "GRADIO_SERVER_PORT"
        self.port = self.port if self.port is not None else int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
        for name in ("max_message_chars", "max_turns", "concurrency", "queue_size", "max_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"{port_from} must be between 1 and 65535, got {self.port}")
        if not 0 < self.feedback_max_mb <= MAX_FEEDBACK_MB:  # larger: no file system holds it, and int() overflowed
            raise ValueError(
                f"--feedback_max_mb must be above 0 and at most {MAX_FEEDBACK_MB:,}, got {self.feedback_max_mb:g}"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"--log_level must be debug, info, warning or error, got {self.log_level}")


def message_text(content) -> str:
    """Gradio sends a message's content as a string (API) or a list of {"type": "text", "text"} blocks (browser).
    Lone surrogates (TypeError in the tokenizer, and unprintable) become U+FFFD."""
    if isinstance(content, str):
        return chat_format.clean_text(content)
    if isinstance(content, dict):
        return message_text(str(content.get("text") or ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(block) for block in content if isinstance(block, (str, dict)))  # one level deep
    return ""


def history_messages(history) -> list[dict]:
    """Gradio's chat history as plain {"role", "content": str} messages; anything but text is left out."""
    messages = []
    for item in history if isinstance(history, (list, tuple)) else []:
        role = item.get("role") if isinstance(item, dict) else None
        if role in ("user", "assistant"):
            messages.append({"role": role, "content": message_text(item.get("content"))})
    return messages


class ModelChoices:
    """The models the Compare tab can pick, by name: loaded on first use and kept, at most one per listed name
    (so memory is bounded by the list), the served model shared with the Chat tab. Nothing else can be loaded:
    a name a client sends is looked up in the list, never used as a path."""

    def __init__(self, sources: dict[str, str], loaded: dict[str, ChatModel], first: str, second: str):
        self.sources = dict(sources)  # name -> folder or Hub id, in the order the lists show them
        self.loaded = dict(loaded)
        self.first, self.second = first, second  # the names A and B start with
        self.lock = threading.Lock()  # two sessions picking the same new stage load it once

    @classmethod
    def fixed(cls, model: ChatModel, compare_model: ChatModel) -> "ModelChoices":
        """Two given models (not from a run folder), named by their source."""
        loaded = {model.source: model, compare_model.source: compare_model}
        return cls({name: name for name in loaded}, loaded, model.source, compare_model.source)

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def known(self, name) -> str | None:
        """The listed name a client sent, or None: anything else (a path, a number, a list) is not a choice."""
        return name if isinstance(name, str) and name in self.sources else None

    def source(self, name: str) -> str:
        return self.loaded[name].source if name in self.loaded else self.sources[name]

    def model(self, name: str) -> ChatModel:
        if name not in self.loaded:
            with self.lock:
                if name not in self.loaded:
                    logger.info(f"loading {self.sources[name]} for the Compare tab ({name})")
                    self.loaded[name] = ChatModel.load(self.sources[name])
        return self.loaded[name]


def run_stage_sources(source: str) -> tuple[dict[str, str], str]:
    """The finished chat stages of the run folder that holds `source` (runs/<run>/<stage>), most aligned first,
    as {stage: folder}, and the served model's name among them. A model outside a run: only itself, by source."""
    folder = Path(source)
    if folder.name not in runs.CHAT_STAGES or not folder.is_dir():
        return {source: source}, source
    stages = {
        stage: str(folder.parent / stage) for stage in runs.CHAT_STAGES if runs.is_finished(folder.parent / stage)
    }
    stages[folder.name] = source  # the served folder itself, finished or a plain model folder
    return {stage: stages[stage] for stage in runs.CHAT_STAGES if stage in stages}, folder.name


def compare_choices(source: str, compare_source: str | None) -> tuple[dict[str, str], str, str | None]:
    """What the Compare tab lists ({name: source}), the name A starts with (the served model) and the one B
    starts with: --compare_model (a listed stage when it is one, else listed under its own source), else sft,
    else the next finished stage after A's, else any other; None when there is nothing to compare with."""
    sources, first = run_stage_sources(source)
    second = None
    if compare_source is not None:
        same = [name for name, path in sources.items() if _same_folder(path, compare_source)]
        second = same[0] if same else compare_source
        sources.setdefault(second, compare_source)
    if second is None:
        second = runs.compared_stage(first, list(sources))
    return sources, first, second


def _same_folder(a: str, b: str) -> bool:
    return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()


class RequestSizeLimit:
    """ASGI middleware: a request body longer than `max_bytes` is answered 413 before Gradio reads it. Gradio keeps
    each session's inputs (ChatInterface saves the message in a State before any handler can refuse it), so 5 MB
    messages, each from a fresh session, grew the server by ~8 MB each (20 of them: 479 -> 639 MB) although every one
    was refused as too long."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Request too large for this app.\n"})
            return
        received = 0

        async def bounded_receive():  # a body sent without its length: counted, and cut off as a client gone
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, bounded_receive, send)


class ChatService:
    """The app's server side: every limit is checked here, never trusted to the browser."""

    def __init__(
        self,
        model: ChatModel,
        compare_model: ChatModel | None = None,
        scorer: RewardScorer | None = None,
        max_message_chars: int = 2000,
        max_turns: int = 20,
        system: str | None = None,
        feedback_log: feedback.FeedbackLog | None = None,
        choices: ModelChoices | None = None,
    ):
        """`choices`: what the Compare tab picks from; without it, `compare_model` makes the fixed pair
        (model, compare_model); with neither there is no Compare tab."""
        self.model, self.scorer = model, scorer
        if choices is None and compare_model is not None:
            choices = ModelChoices.fixed(model, compare_model)
        self.choices = choices
        self.feedback = feedback_log  # None: no feedback buttons
        self.rated: OrderedDict[str, None] = OrderedDict()  # ids of comparisons rated (or being recorded)
        self.rated_lock = threading.Lock()
        self.max_message_chars, self.max_turns = max_message_chars, max_turns
        self.start = [{"role": "system", "content": system}] if system else []

    def refuse(self, message: str) -> None:
        raise gr.Error(message, print_exception=False)

    @property
    def longest_reply_chars(self) -> int:
        return REPLY_CHARS_PER_TOKEN * self.model.context_length  # a reply has at most the context in tokens

    @property
    def max_request_bytes(self) -> int:
        """The largest request body a client of this app can need: a full history of the longest messages and
        replies with the next message, each character escaped in JSON at worst (\\u0001: 6 bytes), and room for the
        rest (sampling values, Gradio's fields)."""
        chars = self.max_turns * (self.max_message_chars + self.longest_reply_chars) + self.max_message_chars
        return 6 * chars + (256 << 10)

    def check_history(self, history) -> list[dict]:
        """The client's history as messages, refused unless it is one the app could have produced: at most
        max_turns user messages and as many replies, each no longer than the app accepts or writes. Checked
        on the raw payload, before anything is tokenized, so a forged history costs no more than a real one."""
        if history is not None and not isinstance(history, (list, tuple)):
            self.refuse("The conversation sent is not a list of messages: clear it to start a new one.")
        if len(history or []) > 2 * self.max_turns:
            self.refuse(
                f"This conversation holds more messages than {self.max_turns} turns can: clear it to start a new one."
            )
        past = history_messages(history)
        limits = {"user": self.max_message_chars, "assistant": self.longest_reply_chars}
        if any(len(m["content"]) > limits[m["role"]] for m in past):
            self.refuse("The conversation holds a message longer than this app accepts: clear it to start a new one.")
        if sum(m["role"] == "user" for m in past) >= self.max_turns:
            self.refuse(f"This conversation reached its limit of {self.max_turns} turns: clear it to start a new one.")
        return past

    def check_message(self, text: str) -> None:
        if not text.strip():
            self.refuse("Empty message: type something first.")
        if len(text) > self.max_message_chars:
            self.refuse(
                f"Message too long: {len(text):,} characters, the limit is {self.max_message_chars:,}. Please shorten it."
            )

    def _stream(
        self,
        model: ChatModel,
        messages: list[dict],
        sampling: Sampling,
        session: str,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """The reply so far, growing piece by piece; the prompt is trimmed to the context and rendered once, here.
        An unexpected failure reaches the user as a plain message; its details go to the server log only.
        `stats` receives the reply's numbers (and whether it ended its turn)."""
        stats = stats if stats is not None else GenerationStats()
        try:
            prompt = model.prepare(messages, sampling.max_new_tokens)
            if dropped := len(messages) - len(prompt.messages):  # else the page shows turns the model never sees
                gr.Info(
                    f"The {dropped} oldest message{'s were' if dropped > 1 else ' was'} left out to fit the model's "
                    f"{model.context_length}-token context: it does not see {'them' if dropped > 1 else 'it'}."
                )
            logger.debug(
                "prompt %s",
                json.dumps(
                    {"session": session, "model": model.source, "messages": prompt.messages}, ensure_ascii=False
                ),
            )
            reply, said = "", False
            for piece in model.stream(prompt, sampling, stats):
                reply, said = reply + piece, True
                yield reply
            if not said:  # else no reply at all: the history lost the turn, and the model saw two user turns in a row
                yield reply
            if not reply.strip():  # else an empty bubble, which reads like a hang or a lost reply
                gr.Info(empty_reply_note(stats))
        except UsageError as err:
            self.refuse(str(err))
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - never sent to the browser: it may hold internals
            logger.exception(f"reply failed for session {session[:8]} ({model.source})")
            self.refuse(INTERNAL_ERROR)
        logger.info(f"reply session {session[:8]} | {model.source} | {stats.summary()[1:-1]}")

    def chat(
        self, message, history, max_new_tokens, temperature, top_k, top_p, request: gr.Request = None
    ) -> Iterator[str]:
        """gr.ChatInterface's function (api_name="chat"): streams the growing reply."""
        past = self.check_history(history)
        text = message_text(message)
        self.check_message(text)
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p).clamped()
        messages = self.start + past + [{"role": "user", "content": text}]
        yield from self._stream(self.model, messages, sampling, session_of(request))

    def check_choice(self, name, side: str) -> str:
        """A client's pick for side A or B: None means the side's default; anything not listed is refused."""
        if self.choices is None:
            self.refuse("This app has no Compare tab: start it with --compare_model, or serve a run folder.")
        if name is None:
            return self.choices.first if side == "A" else self.choices.second
        known = self.choices.known(name)
        if known is None:
            shown = str(name)[:40]  # what the client sent, cut short
            self.refuse(f"Unknown model for {side}: {shown!r}. Choose one of: {', '.join(self.choices.names)}.")
        return known

    def choice_model(self, name: str) -> ChatModel:
        """A listed model, loaded on first use; a load that fails reaches the user as one plain line."""
        try:
            return self.choices.model(name)
        except UsageError as err:
            self.refuse(f"{name} cannot be loaded: {err}")
        except Exception:  # noqa: BLE001 - never sent to the browser: it may hold internals
            logger.exception(f"loading {self.choices.sources[name]} failed")
            self.refuse(INTERNAL_ERROR)

    def compare(
        self,
        prompt,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        model_a=None,
        model_b=None,
        request: gr.Request = None,
    ) -> Iterator[tuple[str, str, str]]:
        """One prompt, the models picked for A and B (by name, None: the defaults), one after the other (each
        gets the full CPU), then the reward scores."""
        yield from (
            update[:3]
            for update in self._compare(prompt, max_new_tokens, temperature, top_k, top_p, model_a, model_b, request)
        )

    def _compare(self, prompt, max_new_tokens, temperature, top_k, top_p, model_a, model_b, request):
        """compare()'s updates, each with the two models that answer and their replies' stats (for the feedback
        record)."""
        names = self.check_choice(model_a, "A"), self.check_choice(model_b, "B")
        text = message_text(prompt)
        self.check_message(text)
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p).clamped()
        models = [self.choice_model(name) for name in names]
        messages = self.start + [{"role": "user", "content": text}]
        session = session_of(request)
        stats = [GenerationStats(), GenerationStats()]
        first = second = ""
        for first in self._stream(models[0], messages, sampling, session, stats[0]):
            yield first, second, "", models, stats
        for second in self._stream(models[1], messages, sampling, session, stats[1]):
            yield first, second, "", models, stats
        yield first, second, self.score_table(messages, first, second), models, stats

    def compare_and_remember(
        self,
        prompt,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        model_a=None,
        model_b=None,
        request: gr.Request = None,
    ):
        """compare(), then the finished comparison kept in the session's server-side state for a choice to rate:
        what is recorded is what the models said (and which models said it), not what a client sends back."""
        locked = [gr.update(interactive=False)] * len(FEEDBACK_BUTTONS)  # nothing to rate until both replies are in
        update = ()
        for update in self._compare(prompt, max_new_tokens, temperature, top_k, top_p, model_a, model_b, request):
            yield *update[:3], None, *locked
        first, second, scores, models, stats = update
        conversation = self.start + [{"role": "user", "content": message_text(prompt)}]
        unlocked = [gr.update(interactive=True)] * len(FEEDBACK_BUTTONS)
        # The id: the feedback buttons run in parallel, and each click reads this same state until one empties it.
        last = {"id": uuid.uuid4().hex, "conversation": conversation, "A": first, "B": second}
        last.update(model_a=models[0].source, model_b=models[1].source)
        last.update(A_ended=stats[0].ended_turn, B_ended=stats[1].ended_turn)
        yield first, second, scores, last, *unlocked

    def pick(self, name, side: str) -> tuple:
        """A list's choice changed: its reply box is relabelled with the model's source and emptied (its reply
        came from the previous model), so are the scores, and a finished comparison can no longer be rated."""
        name = self.check_choice(name, side)
        box = gr.update(label=f"{side}: {self.choices.source(name)}", value="")
        if self.feedback is None:
            return box, ""
        return box, "", None, *[gr.update(interactive=False)] * len(FEEDBACK_BUTTONS)

    def _pick_handler(self, side: str):
        def handler(name):
            return self.pick(name, side)

        return handler

    def record_choice(self, choice: str, last: dict | None) -> tuple:
        """A feedback button: one line in the feedback file; the comparison can be rated once. Clicks on A, B and
        Tie may be handled at the same time, all reading the same comparison: the first claims it, the others are
        refused (a write that fails gives the claim back, so the comparison can still be rated)."""
        if not last or last.get("id") in self.rated:
            self.refuse(NOTHING_TO_RATE)
        if choice in ("A", "B"):  # what reward.py and dpo.py would learn to prefer: refused, the comparison kept
            if not last[choice].strip():
                self.refuse(f"Not recorded: reply {choice} is empty, and an empty reply cannot be the better one.")
            if not last.get(f"{choice}_ended"):
                self.refuse(
                    f"Not recorded: reply {choice} was cut off at the max new tokens, and would be learned as a "
                    "finished reply. Raise the limit and compare again, or rate it a tie."
                )
        if not self.claim(last.get("id")):
            self.refuse(NOTHING_TO_RATE)
        record = feedback.make_record(
            last["conversation"], last["A"], last["B"], choice, last["model_a"], last["model_b"]
        )
        try:
            self.feedback.append(record)
        except feedback.FeedbackError as err:
            with self.rated_lock:
                self.rated.pop(last["id"], None)
            logger.error(f"feedback {choice} not recorded: {err.detail}")  # the owner must learn it
            self.refuse(str(err))
        logger.info(f"feedback {choice} appended to {self.feedback.path}")
        return (
            f"Recorded: {FEEDBACK_LABELS[choice]}. Thank you!",
            None,
            *[gr.update(interactive=False)] * len(FEEDBACK_BUTTONS),
        )

    def claim(self, comparison_id) -> bool:
        """True for the first claim of a comparison's id, False for every later one (or no id)."""
        if not isinstance(comparison_id, str):
            return False
        with self.rated_lock:
            if comparison_id in self.rated:
                return False
            self.rated[comparison_id] = None
            while len(self.rated) > RATED_REMEMBERED:
                self.rated.popitem(last=False)
        return True

    def _choice_handler(self, choice: str):
        def handler(last):
            return self.record_choice(choice, last)

        return handler

    def score_table(self, messages: list[dict], first: str, second: str) -> str:
        if self.scorer is None:
            return ""
        scores = self.scorer.score(
            *(messages + [{"role": "assistant", "content": reply}] for reply in (first, second))
        )
        # Equal as shown is a tie: one batch's two rows can differ in float noise, and "A preferred" beside two
        # equal numbers (as `>=` said of every tie) reads as a ranking that is not there.
        shown = [f"{score:.3f}" for score in scores]
        better = "tie" if shown[0] == shown[1] else f"{'A' if scores[0] > scores[1] else 'B'} preferred"
        return f"**Reward** ({self.scorer.source}): A = {shown[0]}, B = {shown[1]} -> {better}"

    def build(
        self, defaults: Sampling, concurrency: int = 4, queue_size: int = 64, title: str = "fluxchat"
    ) -> gr.Blocks:
        """The app: a Chat tab, a Compare tab when there are models to compare, shared sampling controls."""
        defaults = defaults.clamped()
        with gr.Blocks(title=title) as demo:
            gr.Markdown(f"# {title}\nServing `{self.model.source}` (context {self.model.context_length} tokens).")
            with gr.Accordion("Sampling", open=False):
                with gr.Row():
                    controls = [
                        gr.Slider(
                            *SAMPLING_BOUNDS["max_new_tokens"],
                            value=defaults.max_new_tokens,
                            step=1,
                            # replies are capped at half the context, whatever is asked
                            label=f"Max new tokens (this model writes at most {self.model.reply_budget(10**9)})",
                        ),
                        gr.Slider(
                            *SAMPLING_BOUNDS["temperature"],
                            value=defaults.temperature,
                            step=0.05,
                            label="Temperature (0 = greedy)",
                        ),
                        gr.Slider(*SAMPLING_BOUNDS["top_k"], value=defaults.top_k, step=1, label="Top-k (0 = off)"),
                        gr.Slider(*SAMPLING_BOUNDS["top_p"], value=defaults.top_p, step=0.01, label="Top-p"),
                    ]
            with gr.Tab("Chat"):
                gr.ChatInterface(
                    self.chat,
                    chatbot=gr.Chatbot(height=480, label=Path(self.model.source).name or self.model.source),
                    additional_inputs=controls,
                    api_name="chat",
                    fill_height=False,
                    concurrency_limit=concurrency,
                )
            if self.choices is not None:
                choices = self.choices
                with gr.Tab("Compare"):
                    prompt = gr.Textbox(label="Prompt", placeholder="One prompt, answered by both models")
                    with gr.Row():
                        # allow_custom_value: Gradio's own check of a value would answer a client with a traceback
                        # in the server log; check_choice refuses an unlisted name with the app's usual message.
                        pickers = [
                            gr.Dropdown(choices.names, value=default, label=side, allow_custom_value=True)
                            for side, default in (("A", choices.first), ("B", choices.second))
                        ]
                    with gr.Row():
                        first, second = [
                            gr.Textbox(label=f"{side}: {choices.source(default)}", lines=8, interactive=False)
                            for side, default in (("A", choices.first), ("B", choices.second))
                        ]
                    scores = gr.Markdown()
                    button = gr.Button("Compare", variant="primary")
                    outputs, compare = [first, second, scores], self.compare
                    locks = []  # what a new pick resets: the comparison to rate and its buttons
                    if self.feedback is not None:
                        last = gr.State(None)  # the comparison to rate, kept on the server per session
                        with gr.Row():
                            choice_buttons = [gr.Button(text, interactive=False) for text in FEEDBACK_BUTTONS.values()]
                        feedback_note = gr.Markdown()
                        outputs, compare = outputs + [last, *choice_buttons], self.compare_and_remember
                        locks = [last, *choice_buttons]
                        for choice, choice_button in zip(FEEDBACK_BUTTONS, choice_buttons):
                            choice_button.click(
                                self._choice_handler(choice),
                                [last],
                                [feedback_note, last, *choice_buttons],
                                api_name=f"feedback_{choice.lower()}",
                                concurrency_limit=concurrency,
                            )
                    for side, picker, box in zip("AB", pickers, (first, second)):
                        picker.change(
                            self._pick_handler(side),
                            [picker],
                            [box, scores, *locks],
                            api_visibility="private",
                            queue=False,
                            show_progress="hidden",
                        )
                    gr.on(
                        [button.click, prompt.submit],
                        compare,
                        [prompt, *controls, *pickers],
                        outputs,
                        api_name="compare",
                        concurrency_limit=concurrency,
                    )
        # Gradio's default is one request at a time for the whole app: every user would wait for every other.
        demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
        return demo


FEEDBACK_BUTTONS = {"A": "A is better", "B": "B is better", "tie": "Tie"}
FEEDBACK_LABELS = {"A": "A is better", "B": "B is better", "tie": "a tie"}


def session_of(request) -> str:
    return getattr(request, "session_hash", None) or "-"


def check_address(host: str, port: int) -> None:
    """Fail in one line, before any model is loaded, unless this machine can listen on host:port
    (Gradio would end in a traceback: 'Cannot find empty port')."""
    if host.replace(".", "").isdigit():  # dotted numbers are an IPv4 address, never a name to look up
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            fail(f"--host {host} is not a valid IPv4 address (each of its four numbers is 0-255)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as err:
        fail(f"--host {host}: not an address of this machine ({getattr(err, 'strerror', None) or err})")
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            probe.bind(address)
        except OSError as err:
            fail(f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another --port or --host")


def main(argv: list[str] | None = None):
    args, defaults, _ = parse_config("app", (AppArguments, Sampling), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(args.log_level.upper())

    # Folders only, nothing loaded yet: every flag is checked before the first (slow) load.
    defaults.refuse_out_of_bounds()
    source = resolve_model(args.model, args.model_from)
    compare_source = resolve_model(args.compare_model, args.compare_model_from) if args.compare_model else None
    sources, first, second = compare_choices(source, compare_source)
    no_compare_tab = second is None
    # Without --compare_model, a run folder with two finished chat stages has a Compare tab of its own.
    if args.reward_model and no_compare_tab:
        fail(
            "--reward_model scores the Compare tab's replies: give --compare_model too "
            "(or serve a run folder with two finished chat stages)"
        )
    if args.collect_feedback and no_compare_tab:
        fail(
            "--collect_feedback records which of the Compare tab's two replies is better: give --compare_model too "
            "(or serve a run folder with two finished chat stages)"
        )
    if args.feedback_file and not args.collect_feedback:
        fail("--feedback_file is where --collect_feedback appends choices: give --collect_feedback too")
    feedback_file = feedback.feedback_path(args.feedback_file, source) if args.collect_feedback else None
    # A Space's container must listen on all interfaces (Spaces set GRADIO_SERVER_NAME and SPACE_ID); anywhere
    # else only this machine may connect unless --host says otherwise.
    host = (
        args.host or os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    )
    check_address(host, args.port)
    model = ChatModel.load(source)
    loaded = {first: model}
    if compare_source is not None and second not in loaded:  # loaded now, as before: a broken one fails at start
        loaded[second] = ChatModel.load(compare_source)
    for chat_model in loaded.values():  # else every message would fail, blaming the message
        chat_model.check_system(args.system, defaults.max_new_tokens)
    choices = None if no_compare_tab else ModelChoices(sources, loaded, first, second)
    scorer = RewardScorer(args.reward_model) if args.reward_model else None
    feedback_log = None
    if feedback_file is not None:
        feedback_log = feedback.FeedbackLog(feedback_file, int(args.feedback_max_mb * 1024 * 1024))
        logger.info(f"collecting feedback in {feedback_file}")
    service = ChatService(
        model, None, scorer, args.max_message_chars, args.max_turns, args.system, feedback_log, choices
    )
    demo = service.build(defaults, args.concurrency, args.queue_size)
    logger.info(
        f"serving {model.source} on http://{host}:{args.port} (concurrency {args.concurrency}, queue {args.queue_size})"
    )
    demo.launch(
        server_name=host,
        server_port=args.port,
        share=args.share,
        auth=tuple(args.auth.split(":", 1)) if args.auth else None,
        show_error=False,  # only our gr.Error messages reach the browser, never an exception's internals
        max_file_size=MAX_UPLOAD_BYTES,
        app_kwargs={"middleware": [Middleware(RequestSizeLimit, max_bytes=service.max_request_bytes)]},
        state_session_capacity=args.max_sessions,
        footer_links=["api"],
    )
    return demo


if __name__ == "__main__":
    run_cli(main)
