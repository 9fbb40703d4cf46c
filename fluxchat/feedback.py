"""Human preferences collected in the app's Compare tab: one JSON line per choice, appended safely.

    python app.py --model runs/demo/ppo --compare_model runs/demo/sft --collect_feedback
    python pipeline/reward.py --preset tiny --run_name demo --dataset runs/demo/feedback.jsonl
    python pipeline/dpo.py --preset tiny --run_name demo --dataset builtin runs/demo/feedback.jsonl

A line: {"conversation": [messages before the replies], "chosen": [assistant message],
"rejected": [assistant message], "choice": "A" | "B" | "tie", "model_a", "model_b", "time"}. A tie keeps A's
reply as "chosen" only to keep the shape; readers skip it (a tie is not a pair).

Many app sessions (threads) and several app processes may write the same file at once: every line is
written by one write(2) on a file opened with O_APPEND, under an exclusive flock, so lines never interleave
or tear, and the size check and the write happen under the same lock. The file is bounded: past
`max_bytes` a choice is refused with a message saying so (nothing is written). A file whose last line lost its
newline (edited by hand) gets one first, under the same lock, so the next record starts a line of its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

from fluxchat.cli import fail

CHOICES = ("A", "B", "tie")
FEEDBACK_FILE = "feedback.jsonl"
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


class FeedbackError(Exception):
    """A choice that cannot be recorded (the file is full or unwritable): the message is for the user (the file's
    name only: a web page has no business knowing the server's folders); `detail`, with the full path, is for
    the server's log."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


def is_feedback_row(row: dict) -> bool:
    return isinstance(row, dict) and "conversation" in row and "chosen" in row and "rejected" in row


def as_pair(row: dict) -> dict | None:
    """A feedback line as a TRL explicit-prompt preference row; None for a tie (not a pair). ValueError for a choice
    that is none of CHOICES (a hand-edited line): its chosen/rejected would be a guess. A line without a choice is
    read as its chosen/rejected say."""
    choice = row.get("choice", "A")
    if not isinstance(choice, str) or choice not in CHOICES:
        raise ValueError(f"field 'choice' is {choice!r:.80}; expected one of {', '.join(CHOICES)}")
    if choice == "tie":
        return None
    return {"prompt": row["conversation"], "chosen": row["chosen"], "rejected": row["rejected"]}


def make_record(conversation: list[dict], reply_a: str, reply_b: str, choice: str, model_a: str, model_b: str) -> dict:
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    first, second = (reply_b, reply_a) if choice == "B" else (reply_a, reply_b)
    return {
        "conversation": [{"role": m["role"], "content": m["content"]} for m in conversation],
        "chosen": [{"role": "assistant", "content": first}],
        "rejected": [{"role": "assistant", "content": second}],
        "choice": choice,
        "model_a": model_a,
        "model_b": model_b,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def feedback_path(feedback_file: str | None, model_source: str) -> Path:
    """--feedback_file, or feedback.jsonl in the run folder of the served model (runs/<run>/<stage>)."""
    if feedback_file:
        path = Path(feedback_file)
        if path.is_dir():
            fail(f"--feedback_file {path} is a folder: give a file path, e.g. {path / FEEDBACK_FILE}")
        _refuse_special_files(path, "--feedback_file")
        if path.parent.exists() and not path.parent.is_dir():
            fail(f"--feedback_file {path}: {path.parent} is a file, not a folder")
        if not path.parent.is_dir():
            fail(f"--feedback_file {path}: folder {path.parent} does not exist")
        return _writable(path, "--feedback_file")
    if not Path(model_source).is_dir():
        fail(
            f"--collect_feedback: the served model {model_source} is no local folder, so it has no run folder: give --feedback_file"
        )
    path = Path(model_source).resolve().parent / FEEDBACK_FILE
    _refuse_special_files(path, "--collect_feedback")
    return _writable(path, "--collect_feedback")


def _refuse_special_files(path: Path, flag: str) -> None:
    """Checked before the file is opened: opening a FIFO waits for a reader (the app would hang at start, saying
    nothing), and a device or socket would take JSON lines that no reader of feedback ever sees."""
    if path.exists() and not path.is_file():
        fail(f"{flag}: {path} is not a regular file (a FIFO, device or socket): give the path of a feedback file")


def _writable(path: Path, flag: str) -> Path:
    """Tried at start, not at the first click (where the user would learn it from an error in the page): the file
    opened for appending, or a temporary file made and removed beside it. Permissions alone cannot tell (root, a
    virtual or read-only file system)."""
    try:
        if path.exists():
            os.close(os.open(path, os.O_RDWR | os.O_APPEND))  # read too: append() reads the file's last byte
        else:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
    except OSError as err:
        fail(f"{flag}: cannot write the feedback file {path} ({err.strerror or err})")
    _refuse_other_files(path, flag)
    return path


def _refuse_other_files(path: Path, flag: str) -> None:
    """Choices are appended to the file: one of the user's own (notes.txt, a dataset) would gain JSON lines at its
    end. An existing, non-empty file must be a feedback file already: its first line one of our records."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    try:
        row = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        row = None
    if not is_feedback_row(row):
        fail(
            f"{flag}: {path} exists and is not a feedback file (its line 1 is no feedback record), so choices would "
            f"be appended to it: give a new file name, or an earlier {FEEDBACK_FILE}"
        )


class FeedbackLog:
    """Appends feedback records to one JSONL file; safe from many threads and processes at once."""

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.path, self.max_bytes = Path(path), max_bytes

    def append(self, record: dict) -> int:
        """Write `record` as one line; returns the file's size after it. Raises FeedbackError when full or
        unwritable."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise self._error("open", err) from None
        try:
            # flock is per open file description: every call opens its own, so threads exclude each other too.
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # else this record would be glued onto that line
                line = b"\n" + line
            if size + len(line) > self.max_bytes:
                raise FeedbackError(
                    f"The feedback file {self.path.name} is full ({size:,} bytes, limit {self.max_bytes:,}): "
                    "this choice was not recorded. Ask the app's owner to move the file away or raise --feedback_max_mb.",
                    f"the feedback file {self.path} is full ({size:,} bytes, limit {self.max_bytes:,})",
                )
            written = 0
            try:
                while written < len(line):  # one write(2) in practice; a short write is finished under the lock
                    written += os.write(fd, line[written:])
            except OSError:
                if written:  # never leave half a line (e.g. disk full): cut back to where this line started
                    os.ftruncate(fd, size)
                raise
            return size + len(line)
        except OSError as err:
            raise self._error("write", err) from None
        finally:
            os.close(fd)  # closing releases the lock

    def _error(self, action: str, err: OSError) -> FeedbackError:
        reason = err.strerror or str(err)
        return FeedbackError(
            f"cannot {action} the feedback file {self.path.name}: {reason}",
            f"cannot {action} the feedback file {self.path}: {reason}",
        )
