"""Instruction and preference data: every format normalised to chat messages.

Local .jsonl/.json files (gzipped too) are parsed here line by line so an error names the exact line;
parquet files and Hub ids go through `datasets`. A file's format is detected from its first row and
every row must then fit it, so a missing field is reported as missing rather than as "unknown format".
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from pathlib import Path

import datasets

from fluxchat import data, feedback, tasks
from fluxchat.cli import fail

BUILTIN = "builtin"
CONVERSATION_FORMATS = (
    "messages (OpenAI), conversations (ShareGPT from/value), prompt+completion, "
    "instruction+output[+input] (Alpaca), instruction+response[+context] (Dolly), instruction+instances (self-instruct)"
)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "system": "system",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
# Keys of one row of some format: a .json object holding one of these is a row, not a wrapper of rows.
ROW_KEYS = {"messages", "conversations", "conversation", "prompt", "completion", "chosen", "rejected", "instruction"}


def read_rows(source: str):
    """(name, iterator of (row label, row)) for a local file or a Hub dataset id."""

    path = Path(source)
    name = source
    if not path.exists() and looks_like_hub_dataset(source):
        datasets.disable_progress_bars()
        try:
            rows = datasets.load_dataset(source, split="train")
        except Exception as err:  # the Hub client raises many types; the user needs one line
            fail(f"{source}: could not load as a local file or Hub dataset ({str(err).splitlines()[0][:200]})")
        return name, ((f"row {i + 1}", row) for i, row in enumerate(rows))
    if path.is_dir() and data.is_saved_dataset(path, flag=""):
        rows = data.load_saved_dataset(path)
        return name, ((f"row {i + 1}", row) for i, row in enumerate(rows))
    if path.is_dir():  # e.g. a cloned dataset repo: its data files are named one by one, never guessed
        found = sorted(
            p.name for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet"))
        )
        holds = f"it holds {', '.join(found[:5])}: name one of them" if found else "it holds none"
        fail(
            f"{source} is a folder: a data source is one .jsonl, .json or .parquet file, a folder saved with "
            f"datasets' save_to_disk, or a Hub dataset id; {holds}"
        )
    if not path.is_file():
        fail(f"{source}: no such file (give a .jsonl/.json/.parquet file, a Hub dataset id, or '{BUILTIN}')")
    suffixes = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffixes in (".jsonl", ".jsonl.gz"):
        return name, _jsonl_rows(path)
    if suffixes in (".json", ".json.gz"):
        return name, _json_rows(path)
    if suffixes == ".parquet":
        rows = data.load_rows_file(path)
        return name, ((f"row {i + 1}", row) for i, row in enumerate(rows))
    fail(f"{path}: unsupported file type '{suffixes}' (use .jsonl, .jsonl.gz, .json or .parquet)")


def looks_like_hub_dataset(value: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value)) and not value.endswith(
        (".json", ".jsonl", ".gz", ".parquet")
    )


def _open_text(path: Path):
    # utf-8-sig: a leading byte-order mark (Windows editors write one) is dropped, not read as JSON.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _jsonl_rows(path: Path):
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    fail(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno})")
                except RecursionError:  # Python's parser recurses once per nesting level
                    fail(f"{path}: line {number} is not valid JSON (nested too deeply)")
                if not isinstance(row, dict):
                    fail(f"{path}: line {number} must be a JSON object, got {type(row).__name__}")
                yield f"line {number}", row
    except zlib.error as err:  # a corrupt deflate stream: not an OSError, unlike a bad gzip header
        fail(f"{path}: could not be read as gzip (zlib.error: {str(err)[:120]})")
    except (UnicodeDecodeError, OSError, EOFError) as err:
        fail(f"{path}: could not be read as UTF-8 JSON lines ({err.__class__.__name__}: {str(err)[:120]})")


def _json_rows(path: Path):
    try:
        with _open_text(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        fail(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); for one object per line name it .jsonl"
        )
    except RecursionError:  # Python's parser recurses once per nesting level
        fail(f"{path}: not valid JSON (nested too deeply)")
    except zlib.error as err:  # a corrupt deflate stream: not an OSError, unlike a bad gzip header
        fail(f"{path}: could not be read as gzip (zlib.error: {str(err)[:120]})")
    except (UnicodeDecodeError, OSError, EOFError) as err:
        fail(f"{path}: could not be read as UTF-8 JSON ({err.__class__.__name__})")
    if isinstance(data, dict) and ROW_KEYS & set(data):  # else its one list (e.g. 'messages') would be read as rows
        fail(f"{path}: a .json file holds a list of rows; this one holds a single row: wrap it in [...] or use .jsonl")
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: one list of rows inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            fail(f"{path}: expected a JSON list of rows (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        fail(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            fail(f"{path}: row {i + 1} must be a JSON object, got {type(row).__name__}")
        yield f"row {i + 1}", row


class _RowError(Exception):
    """A problem with one row; the caller adds the file and row."""


def _text_field(row: dict, key: str, required: bool = True, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(f"missing field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"field '{key}' must be a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise _RowError(f"field '{key}' is empty")
    return value


def _user_turn(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _message_list(value, key: str, role_key: str = "role", content_key: str = "content", role_map=None) -> list[dict]:
    if not isinstance(value, list):
        raise _RowError(f"field '{key}' must be a list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _RowError(f"{key}[{i}] must be an object with '{role_key}' and '{content_key}'")
        for field_name in (role_key, content_key):
            if field_name not in message:
                raise _RowError(f"{key}[{i}] has no field '{field_name}'")
        role = message[role_key]
        role = role_map.get(str(role).lower()) if role_map else role
        if role not in ("system", "user", "assistant"):
            allowed = ", ".join(role_map) if role_map else "system, user, assistant"
            raise _RowError(f"{key}[{i}].{role_key} is {message[role_key]!r}; expected one of {allowed}")
        if not isinstance(message[content_key], str):
            raise _RowError(f"{key}[{i}].{content_key} must be a string, got {type(message[content_key]).__name__}")
        messages.append({"role": role, "content": message[content_key]})
    return messages


def _text_or_messages(value, key: str, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):  # else _message_list's "must be a list of messages" hides that text will do
        raise _RowError(f"field '{key}' must be text or a list of messages, got {type(value).__name__}")
    return _message_list(value, key)


def _detect_conversation_format(columns) -> str | None:
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "instruction" in columns:
        if "instances" in columns:
            return "self_instruct"
        if "output" in columns:
            return "alpaca"
        if "response" in columns:
            return "dolly"
    return None


def first_blank_turn(messages: list[dict]) -> int | None:
    """The index of the first user or assistant message with no text (an empty system prompt is harmless)."""
    return next((i for i, m in enumerate(messages) if m["role"] != "system" and not m["content"].strip()), None)


def _finish_conversation(messages: list[dict], names: list[str]) -> list[dict]:
    """Trailing user turns carry no answer to learn from; a conversation needs a user and an answer.
    `names[i]` names messages[i] in the row, for an empty message (an empty system prompt is harmless)."""
    while messages and messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError("has no assistant message")
    if not any(m["role"] == "user" for m in messages):
        raise _RowError("has no user message before the assistant's")
    if (blank := first_blank_turn(messages)) is not None:
        raise _RowError(f"{names[blank]} is empty")
    return messages


def _message_names(value, key: str, content_key: str = "content") -> list[str]:
    if isinstance(value, str):
        return [f"field '{key}'"]
    return [f"{key}[{i}].{content_key}" for i in range(len(value))]


def _row_conversations(fmt: str, row: dict) -> list[list[dict]]:
    if fmt == "messages":
        if "messages" not in row:
            raise _RowError("missing field 'messages'")
        messages = _message_list(row["messages"], "messages")
        return [_finish_conversation(messages, _message_names(messages, "messages"))]
    if fmt == "sharegpt":
        if "conversations" not in row:
            raise _RowError("missing field 'conversations'")
        turns = row["conversations"]
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        content_key = "value" if "from" in first or "value" in first or not first else "content"
        if content_key == "value":
            messages = _message_list(turns, "conversations", "from", "value", SHAREGPT_ROLES)
        else:
            messages = _message_list(turns, "conversations")
        return [_finish_conversation(messages, _message_names(messages, "conversations", content_key))]
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in row:
                raise _RowError(f"missing field '{key}'")
        prompt = _text_or_messages(row["prompt"], "prompt", "user")
        completion = _text_or_messages(row["completion"], "completion", "assistant")
        names = _message_names(row["prompt"], "prompt") + _message_names(row["completion"], "completion")
        return [_finish_conversation(prompt + completion, names)]
    instruction = _text_field(row, "instruction")
    if fmt == "self_instruct":
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances:
            raise _RowError(
                "field 'instances' must be a non-empty list of {input, output}"
                if "instances" in row
                else "missing field 'instances'"
            )
        out = []
        for i, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise _RowError(f"instances[{i}] must be an object with 'input' and 'output'")
            try:
                extra = _text_field(instance, "input", required=False)
                output = _text_field(instance, "output")
            except _RowError as err:
                raise _RowError(f"instances[{i}]: {err}") from None
            out.append(
                [{"role": "user", "content": _user_turn(instruction, extra)}, {"role": "assistant", "content": output}]
            )
        return out
    answer_key, extra_key = ("output", "input") if fmt == "alpaca" else ("response", "context")
    extra = _text_field(row, extra_key, required=False)
    answer = _text_field(row, answer_key)
    return [[{"role": "user", "content": _user_turn(instruction, extra)}, {"role": "assistant", "content": answer}]]


def load_conversations(sources: list[str], corpus_file: str | None = None) -> list[dict]:
    """[{"messages": [...]}] from every source, concatenated in order (mix sources by listing them).

    A source is a local .jsonl/.jsonl.gz/.json/.parquet file, a Hub dataset id, or "builtin" (the
    built-in tasks' train split; quote/speaker read `corpus_file`, default tinyshakespeare).
    """
    if not sources:
        fail("no instruction data given: pass files, Hub dataset ids, or 'builtin'")
    out: list[dict] = []
    for source in sources:
        if source == BUILTIN:
            out += [
                {"messages": example["messages"]} for example in tasks.conversations("train", corpus_file=corpus_file)
            ]
            continue
        name, rows = read_rows(source)
        fmt = None
        count = 0
        for label, row in rows:
            if fmt is None:
                fmt = _detect_conversation_format(row.keys())
                if fmt is None:
                    fail(
                        f"{name}: {label}: unrecognised columns ({', '.join(sorted(row.keys()))}); expected one of: {CONVERSATION_FORMATS}"
                    )
            try:
                conversations = _row_conversations(fmt, row)
            except _RowError as err:
                own = _detect_conversation_format(row.keys())
                mixed = f" (the first row made this a {fmt} file; this row is {own}: one format per file)"
                fail(f"{name}: {label}: {err}{mixed if own not in (None, fmt) else ''}")
            out += [{"messages": messages} for messages in conversations]
            count += 1
        if count == 0:
            fail(f"{name}: no rows")
    return out


def _parse_transcript(text: str) -> list[dict]:
    """hh-rlhf style "\\n\\nHuman: ...\\n\\nAssistant: ..." text into messages."""
    pieces = HH_TURN.split(text)
    messages = []
    if pieces[0].strip():  # text before the first marker belongs to the user
        messages.append({"role": "user", "content": pieces[0].strip()})
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def _is_transcript(text: str) -> bool:
    return "\n\nAssistant:" in text or text.startswith(("\n\nHuman:", "Human:"))


def _common_prefix_length(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _row_preference(row: dict) -> dict:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _RowError(f"missing field '{key}'")
        if not isinstance(row[key], (str, list)):
            raise _RowError(f"field '{key}' must be a string or a list of messages, got {type(row[key]).__name__}")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row and row["prompt"] is not None:
        if not isinstance(row["prompt"], (str, list)):
            raise _RowError(
                f"field 'prompt' must be a string or a list of messages, got {type(row['prompt']).__name__}"
            )
        prompt = _text_or_messages(row["prompt"], "prompt", "user")
        return {
            "prompt": prompt,
            "chosen": _text_or_messages(chosen, "chosen", "assistant"),
            "rejected": _text_or_messages(rejected, "rejected", "assistant"),
        }
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _RowError("fields 'chosen' and 'rejected' must both be text or both be message lists")
    if isinstance(chosen, str) and (_is_transcript(chosen) or _is_transcript(rejected)):
        # The prompt is the shared text up to its last "\n\nAssistant:" (hh-rlhf's convention).
        shared = chosen[: _common_prefix_length(chosen, rejected)]
        cut = shared.rfind("\n\nAssistant:")
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if "\n\nAssistant:" not in text:
                raise _RowError(f"field '{key}' has no \"\\n\\nAssistant:\" turn")
        if cut < 0:
            raise _RowError("'chosen' and 'rejected' share no turns before their last \"\\n\\nAssistant:\"")
        return {
            "prompt": _parse_transcript(chosen[:cut]),
            "chosen": _parse_transcript(chosen[cut:]),
            "rejected": _parse_transcript(rejected[cut:]),
        }
    if isinstance(chosen, str):  # implicit prompt in plain text: the shared leading words
        shared = chosen[: _common_prefix_length(chosen, rejected)]
        cut = shared.rfind(" ") + 1 if shared and not (shared == chosen or shared == rejected) else 0
        prompt = [{"role": "user", "content": chosen[:cut].strip()}] if chosen[:cut].strip() else []
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen[cut:].strip()}],
            "rejected": [{"role": "assistant", "content": rejected[cut:].strip()}],
        }
    chosen_messages = _message_list(chosen, "chosen")
    rejected_messages = _message_list(rejected, "rejected")
    shared = _common_prefix_length(chosen_messages, rejected_messages)
    while shared and chosen_messages[shared - 1]["role"] == "assistant":  # the answers start after the last user turn
        shared -= 1
    return {
        "prompt": chosen_messages[:shared],
        "chosen": chosen_messages[shared:],
        "rejected": rejected_messages[shared:],
    }


def _check_replies(pair: dict) -> None:
    """Each reply must hold an assistant message (a user turn taken for the reply teaches nothing), and the chosen
    one no blank turn: it would teach a model to prefer saying nothing. An empty rejected reply is kept, as hh-rlhf
    itself holds some: "saying nothing is worse" is a real preference. The prompt is not checked either: hh-rlhf's
    transcripts hold empty turns there too."""
    for key in ("chosen", "rejected"):
        if not pair[key]:
            raise _RowError(f"field '{key}' has nothing after the prompt")
        if not any(message["role"] == "assistant" for message in pair[key]):
            raise _RowError(f"field '{key}' has no assistant reply after the prompt")
    if (blank := first_blank_turn(pair["chosen"])) is not None:
        role = pair["chosen"][blank]["role"]
        raise _RowError(
            "field 'chosen' is empty" if len(pair["chosen"]) == 1 else f"field 'chosen' has an empty {role} turn"
        )


def load_preferences(sources: list[str], corpus_file: str | None = None) -> tuple[list[dict], int]:
    """([{"prompt", "chosen", "rejected"}] as message lists, number of dropped chosen == rejected pairs).

    Accepts TRL preference data (explicit prompt or implicit shared prefix, text or conversational),
    hh-rlhf transcripts (.jsonl.gz is fine), the app's feedback file (ties skipped), or "builtin" (the
    built-in tasks' train pairs).
    """
    if not sources:
        fail("no preference data given: pass files, Hub dataset ids, or 'builtin'")
    out: list[dict] = []
    dropped = ties = 0
    for source in sources:
        if source == BUILTIN:
            pairs = tasks.preference_pairs("train", corpus_file=corpus_file)
            out += [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in pairs]
            continue
        name, rows = read_rows(source)
        count = 0
        for label, row in rows:
            count += 1
            if feedback.is_feedback_row(row):  # a choice made in the app's Compare tab (fluxchat/feedback.py)
                try:
                    row = feedback.as_pair(row)
                except ValueError as err:
                    fail(f"{name}: {label}: {err}")
                if row is None:  # a tie is not a pair
                    ties += 1
                    continue
            try:
                pair = _row_preference(row)
                if pair["chosen"] == pair["rejected"]:
                    dropped += 1
                    continue
                _check_replies(pair)
            except _RowError as err:
                fail(f"{name}: {label}: {err}")
            out.append(pair)
        if count == 0:
            fail(f"{name}: no rows")
    if not out:
        fail(
            f"no usable preference pairs in {', '.join(sources)}: {ties} row(s) were ties (a tie is not a pair), "
            f"{dropped} had chosen == rejected"
        )
    return out, dropped


def split_heldout(rows: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train rows, held-out rows): a seeded shuffle, the last `fraction` held out (at least one row), less the
    held-out rows that are also training rows. Data drawn with replacement repeats rows (the built-in tasks' 35,000
    SFT conversations hold many twice): 23% of SFT's held-out conversations were training conversations too, so its
    "held-out" eval loss was partly a training loss."""

    if not 0 < fraction < 1:
        fail(f"held-out fraction must be between 0 and 1, got {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, int(round(len(rows) * fraction)))
    if n_heldout >= len(rows):
        fail(f"cannot hold out {fraction:.0%} of {len(rows)} rows and keep any for training")
    cut = len(rows) - n_heldout
    train = [rows[i] for i in order[:cut]]
    seen = {_row_key(row) for row in train}
    return train, [rows[i] for i in order[cut:] if _row_key(rows[i]) not in seen]


def _row_key(row) -> str:
    return json.dumps(row, sort_keys=True, default=str)
