"""Loading text for tokenizer training and pretraining, written once for every source.

Sources: local `.txt` / `.jsonl` / `.json` / `.parquet` files or folders of them, or a Hub dataset id,
all through `datasets`. A `.txt` file is one document (we keep its line breaks); jsonl/parquet rows
are documents read from `text_column`. The held-out split is the last `validation_fraction` of each
text file (nanoGPT's split) or of the rows of a row dataset, so train and validation never overlap.

Two readers over the same sources: `load_text` returns lists (tokenizer training), `iter_text` streams
(split, chunk, end_of_document) without ever holding a whole file or dataset (pretraining's token shards).
"""

from __future__ import annotations

import codecs
import json
import mmap
import os
import re
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fluxchat import chat_format
from fluxchat.cli import fail
from fluxchat.config import REPO_ROOT
from fluxchat.runs import atomic_write_text

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHIPPED_CORPUS = REPO_ROOT / "data" / "tinyshakespeare.txt"  # the only data file the project ships


def cache_dir() -> Path:
    return Path(os.environ.get("FLUXCHAT_CACHE", Path.home() / ".cache" / "fluxchat"))


def default_corpus(flag: str = "--train_file") -> Path:
    """tinyshakespeare as shipped in data/ (see data/NOTICE.md); where the package was installed without
    that folder, downloaded once and cached; offline, a one-line error names `flag`, the caller's own flag for a corpus."""
    if SHIPPED_CORPUS.is_file():
        return SHIPPED_CORPUS
    path = cache_dir() / "tinyshakespeare.txt"
    if path.is_file():
        return path
    hint = f"pass {flag} PATH (e.g. {flag} ../shared/data/pretrain/tinyshakespeare.txt)"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        fail(f"offline (HF_HUB_OFFLINE=1) and tinyshakespeare is not cached at {path}: {hint}")
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=20) as response:
            data = response.read()
    except OSError as err:
        fail(f"could not download tinyshakespeare from {TINYSHAKESPEARE_URL} ({err.__class__.__name__}): {hint}")
    atomic_write_text(path, data.decode("utf-8"))
    print(f"downloaded tinyshakespeare ({len(data):,} bytes) to {path}")
    return path


def expand_files(paths: list[str], flag: str = "--train_file", check: bool = True) -> list[Path]:
    """Files named directly or found in folders; each must exist and be non-empty (and, `check`, be UTF-8).

    A folder's hidden files and folders are left out, as git and `datasets` leave them: a Jupyter autosave
    (`.ipynb_checkpoints/x-checkpoint.txt`) is a copy whose held-out tail would be trained on beside the original's.
    A file reached twice (named and in its folder) is read once: each reading would double its weight unsaid."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and is_saved_dataset(path, flag):
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            # A saved dataset inside is one source: its state.json and dataset_info.json are no rows of text.
            saved = {p.parent for p in found if p.name == "state.json" and is_saved_dataset(p.parent, flag)}
            found = [p for p in found if not saved & set(p.parents)] + sorted(saved)
            if not found:
                fail(f"{flag} {path}: folder has no {'/'.join(TEXT_SUFFIXES)} files (hidden ones left out)")
            files += found
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                fail(f"{flag} {path}: unsupported file type '{path.suffix}' (use {', '.join(TEXT_SUFFIXES)})")
            files.append(path)
        elif path.exists():  # a pipe, a device (/dev/null), a socket: `no such file` was untrue
            fail(f"{flag} {path}: not a regular file or folder (a pipe or a device): give a text file")
        else:
            fail(f"{flag} {path}: no such file or folder")
    seen: dict[Path, Path] = {}
    for path in files:
        seen.setdefault(path.resolve(), path)
    if len(seen) < len(files):
        twice = next(p for p in files if seen[p.resolve()] is not p)
        print(f"note: {flag}: {twice} is named more than once; read once", file=sys.stderr, flush=True)
    files = list(seen.values())
    for path in files:
        if path.stat().st_size == 0:
            fail(f"{flag} {path}: file is empty")
        if check and path.suffix != ".parquet" and not path.is_dir():
            check_utf8(path, flag)
    return files


def is_saved_dataset(path: Path, flag: str) -> bool:
    """Whether `path` is a folder written by datasets' `save_to_disk` (read with `load_from_disk`). Its metadata
    files were read as rows of text before ("no 'text' column (columns: citation, description, ...)"). A saved
    DatasetDict (one folder per split) is refused naming its splits: which one to read is the user's call."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if is_saved_dataset(p, flag))
        fail(
            f"{f'{flag} ' if flag else ''}{path} holds the splits {', '.join(splits) or '(none)'} of a saved DatasetDict: name one, e.g. "
            f"{path / ('train' if 'train' in splits or not splits else splits[0])}"
        )
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def load_saved_dataset(path: Path):
    """A `save_to_disk` folder's rows, memory-mapped from its own Arrow files."""
    import datasets  # heavy: see load_hub_dataset

    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a damaged folder
        fail(f"{path}: could not be read as a saved dataset ({_cause(err)})")


READ_CHUNK = 1 << 20  # bytes (or characters) read at a time: a 1 GB file never sits in memory whole


def check_utf8(path: Path, flag: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            if b"\x00" in chunk:  # anywhere: NUL bytes past the start were trained on as text
                at = offset + chunk.index(b"\x00")
                fail(f"{flag} {path}: looks binary (NUL bytes at offset {at}), expected UTF-8 text")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                fail(
                    f"{flag} {path}: not UTF-8 text (invalid byte at offset {offset + err.start}); re-encode it as UTF-8"
                )
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        fail(f"{flag} {path}: not UTF-8 text (truncated character at the end); re-encode it as UTF-8")


def _split(docs: list[str], validation_fraction: float, by_chars: bool):
    if by_chars:  # one long document: cut the text itself at (1 - fraction)
        text = docs[0]
        cut = int(len(text) * (1 - validation_fraction))
        return [text[:cut]], ([text[cut:]] if validation_fraction > 0 else [])
    cut = int(len(docs) * (1 - validation_fraction))
    if validation_fraction > 0 and cut == len(docs) and len(docs) > 1:
        cut -= 1  # keep at least one held-out row
    return docs[:cut], docs[cut:]


def load_text(
    train_files: list[str] | None,
    dataset_name: str | None,
    text_column: str = "text",
    validation_fraction: float = 0.1,
    dataset_split: str = "train",
    dataset_config_name: str | None = None,
) -> tuple[list[str], list[str]]:
    """(train documents, validation documents) from files, a Hub dataset, or the default corpus."""
    import datasets  # datasets only when text is loaded: a second of import time for commands that never read any

    datasets.disable_progress_bars()
    if dataset_name:
        rows = load_hub_dataset(dataset_name, dataset_config_name, dataset_split)
        sources = [("--dataset_name " + dataset_name, rows, False)]
    else:
        files = expand_files(train_files) if train_files else [default_corpus()]
        sources = []
        for path in files:
            if path.suffix == ".txt":
                rows = datasets.load_dataset(  # utf-8-sig: as _read_text_chunks, a leading byte-order mark goes
                    "text", data_files=str(path), sample_by="document", split="train", encoding="utf-8-sig"
                )
                sources.append((str(path), rows, True))
            else:
                sources.append((str(path), load_rows_file(path), False))
    train, validation = [], []
    for name, rows, is_text_file in sources:
        column = "text" if is_text_file else text_column
        if column not in rows.column_names:
            fail(f"{name}: no '{column}' column (columns: {', '.join(rows.column_names)}); set --text_column")
        docs = list(_checked_docs(name, rows[column], column))
        if not docs:
            fail(
                f"{name}: no text in the file (only whitespace)"
                if is_text_file
                else f"{name}: no text found in column '{column}'"
            )
        part_train, part_val = _split(docs, validation_fraction, by_chars=is_text_file)
        train += part_train
        validation += part_val
    return train, validation


def load_hub_dataset(name: str, config_name: str | None, split: str, streaming: bool = False):
    """`datasets.load_dataset(name, config_name, split=...)`; anything that goes wrong (unknown name or
    config offline, no such split) becomes one line naming the flags."""
    import datasets  # heavy (pyarrow, pandas): only stages that read data pay for it

    datasets.disable_progress_bars()
    what = (
        f"--dataset_name {name}"
        + (f" --dataset_config_name {config_name}" if config_name else "")
        + f" (split {split!r})"
    )
    if Path(name).is_dir() and is_saved_dataset(Path(name), "--dataset_name"):  # datasets: "use load_from_disk"
        fail(f"--dataset_name {name} is a dataset saved with save_to_disk: pass it as --train_file {name}")
    try:
        return datasets.load_dataset(name, config_name, split=split, streaming=streaming)
    except Exception as err:  # the Hub client raises many types; the user needs one line
        fail(
            f"{what}: could not load ({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__})"
        )


@dataclass
class TextSource:
    """One place text comes from: a .txt file (one document), a row file, or a Hub dataset (rows)."""

    name: str  # for messages: the path or `--dataset_name X`
    kind: str  # "txt", "rows" (jsonl/json/parquet) or "hub"
    path: Path | None = None
    dataset: tuple[str, str | None, str, bool] | None = None  # (name, config, split, streaming)

    def fingerprint(self) -> dict:
        """What identifies this source's content for a cache: path, size and mtime of a file; the
        dataset's name/config/split (plus its files' sizes and mtimes when it is a local folder)."""
        if self.path is not None and self.path.is_dir():  # a saved dataset: its files say what it holds
            return {"path": str(self.path.resolve()), "files": _file_stats(self.path)}
        if self.path is not None:
            stat = self.path.stat()
            return {"path": str(self.path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        name, config, split, streaming = self.dataset
        local = Path(name)
        return {
            "dataset": name,
            "config": config,
            "split": split,
            "streaming": streaming,
            "files": _file_stats(local) if local.is_dir() else [],
        }

    def size_bytes(self) -> int | None:
        if self.path is not None and self.path.is_dir():
            return sum(size for _, size, _ in _file_stats(self.path))
        return self.path.stat().st_size if self.path is not None else None


def _file_stats(folder: Path) -> list[list]:
    return [
        [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.rglob("*")) if p.is_file()
    ]


def text_sources(
    train_files: list[str] | None,
    dataset_name: str | None,
    dataset_config_name: str | None = None,
    dataset_split: str = "train",
    streaming: bool = False,
) -> list[TextSource]:
    """The sources `iter_text` reads, without reading them (so a cache can be checked first)."""
    if streaming and not dataset_name:
        fail(
            "--streaming reads a Hub dataset as it downloads: give --dataset_name (local files are already read in pieces)"
        )
    if dataset_config_name and not dataset_name:
        fail("--dataset_config_name needs --dataset_name")
    if dataset_name:
        return [
            TextSource(
                f"--dataset_name {dataset_name}",
                "hub",
                dataset=(dataset_name, dataset_config_name, dataset_split, streaming),
            )
        ]
    files = expand_files(train_files, check=False) if train_files else [default_corpus()]
    return [TextSource(str(p), "txt" if p.suffix == ".txt" else "rows", path=p) for p in files]


def describe_sources(sources: list[TextSource], shown: int = 3) -> str:
    """For the stage's log: which text it read ("2 files: a.txt, b.jsonl"), so a folder's surprise is seen."""
    names = [source.name for source in sources]
    if len(names) == 1:
        return names[0]
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"{len(names)} files: {listed}"


def check_sources(sources: list[TextSource]) -> None:
    """The content checks `expand_files` skipped: run them before reading (not on a cache hit)."""
    for source in sources:
        if source.path is not None and source.path.suffix != ".parquet" and not source.path.is_dir():
            check_utf8(source.path, "--train_file")


def iter_text(
    sources: list[TextSource], text_column: str, validation_fraction: float
) -> Iterator[tuple[str, str, bool]]:
    """Every source's text as (split, chunk, end_of_document), split "train" or "validation", in order.

    The same documents and the same train/validation cut as `load_text`, read piece by piece: a .txt file
    in chunks of characters (its held-out tail starts at character int(n * (1 - fraction))), rows one at a
    time. A streamed Hub dataset cannot be counted first: every round(1 / fraction)-th document is held out.
    """
    for source in sources:
        if source.kind == "txt":
            yield from _iter_txt(source.path, validation_fraction)
        elif source.kind == "rows":
            yield from _iter_rows(source.name, load_rows_file(source.path), text_column, validation_fraction)
        elif source.dataset[3]:
            yield from _iter_stream(source, text_column, validation_fraction)
        else:
            rows = load_hub_dataset(*source.dataset[:3])
            yield from _iter_rows(source.name, rows, text_column, validation_fraction)


def _read_text_chunks(path: Path) -> Iterator[str]:
    # Text mode, as datasets' "text" builder reads it: "\r\n" and "\r" become "\n"; a leading byte-order mark goes.
    with open(path, encoding="utf-8-sig") as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk


def _iter_txt(path: Path, validation_fraction: float):
    n_chars, has_text = 0, False
    for chunk in _read_text_chunks(path):
        n_chars += len(chunk)
        has_text = has_text or bool(chunk.strip())
    if not has_text:
        fail(f"{path}: no text in the file (only whitespace)")
    cut = int(n_chars * (1 - validation_fraction))
    position = 0
    for chunk in _read_text_chunks(path):
        end = position + len(chunk)
        if position < cut:
            yield "train", chunk[: cut - position], end >= cut
        if end > cut and validation_fraction > 0:
            yield "validation", chunk[max(cut - position, 0) :], end == n_chars
        position = end
    if cut == n_chars and validation_fraction > 0:  # an empty held-out tail is still a document
        yield "validation", "", True
    if cut == 0:
        yield "train", "", True


def load_rows_file(path: Path):
    """A local .jsonl/.json/.parquet file as an Arrow table memory-mapped from datasets' cache (rows are read
    from disk, not held); a file that does not parse is one line naming it and, for JSON, the line at fault.
    datasets logs its own "Failed to load JSON ..." line before raising: quiet for this call, as our line says it."""
    import datasets  # heavy: see load_hub_dataset
    from datasets.utils import logging as datasets_logging

    if path.is_dir():  # expand_files lets only a saved dataset's folder through
        return load_saved_dataset(path)
    datasets.disable_progress_bars()
    builder = "parquet" if path.suffix == ".parquet" else "json"
    if builder == "parquet" and _parquet_row_count(path) == 0:  # else Arrow's "BatchSize must be greater than 0"
        fail(f"{path}: no rows")
    if builder == "json":
        _refuse_rows_that_are_not_objects(path)
    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        cause = _json_fault(path) or _cause(err)
        if "corresponds to no data" in cause:  # datasets' words for a file of blank lines or `{}` rows
            fail(f"{path}: no rows with any field (only blank lines or empty objects)")
        fail(f"{path}: could not be read as {builder} ({cause})")
    finally:
        datasets_logging.set_verbosity(level)


# A line of a JSON-lines file, after the first, that holds something other than an object (`null`, a number, an
# array, text). Led by the newline, not `^` in MULTILINE mode: the engine then skips from newline to newline
# (2 GB/s here, against 0.2).
_NOT_AN_OBJECT_LINE = re.compile(rb"\n[ \t\r]*[^{\s]")
_FIRST_CHARACTER = re.compile(rb"\S")


def _refuse_rows_that_are_not_objects(path: Path) -> None:
    """One line naming the first row of a .jsonl/.json file that is no JSON object. Arrow's JSON reader crashes the
    whole process on a `null` row where a block of lines starts (a segfault, exit 139, not a word said): a corpus
    file of nulls ended pretraining and the tokenizer so. Searched in the mapped file by a compiled pattern, not
    parsed in Python: a corpus may be gigabytes. A .json list (read whole by datasets as well) is checked row by row."""
    if path.stat().st_size == 0:  # nothing to map; the reader's own line says the file is empty
        return
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        start = 3 if view[:3] == codecs.BOM_UTF8 else 0
        first = _FIRST_CHARACTER.search(view, start)
        if first is None:
            return
        if view[first.start() : first.start() + 1] == b"[":
            try:
                rows = json.loads(bytes(view[start:]))
            except (ValueError, RecursionError):  # not JSON at all: the reader's own line says where
                return
            bad = next((i for i, row in enumerate(rows) if not isinstance(row, (dict, str))), None)
            if isinstance(rows, list) and bad is not None:
                fail(f"{path}: row {bad + 1} must be a JSON object, got {_json_kind(rows[bad])}")
            return
        try:  # a pretty-printed object spread over lines (one row of a .json file) is no JSON-lines file
            head = json.loads(_line_at(view, first.start()))
        except (ValueError, RecursionError):
            return
        if isinstance(head, dict):
            found = _NOT_AN_OBJECT_LINE.search(view, first.start())
            if found is None:
                return
            at = found.start() + 1
        else:
            at = first.start()
        step = 1 << 24  # mmap has no count(): 16 MB slices at a time
        number = 1 + sum(view[i : min(i + step, at)].count(b"\n") for i in range(0, at, step))
        line = _line_at(view, at)
    try:
        kind = _json_kind(json.loads(line))
    except (ValueError, RecursionError):
        fail(f'{path}: line {number} is not a JSON object (one object per line, such as {{"text": "..."}})')
    fail(f"{path}: line {number} must be a JSON object, got {kind}")


def _line_at(view, at: int) -> bytes:
    end = view.find(b"\n", at)
    return bytes(view[at : end if end != -1 else len(view)])


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {int: "a number", float: "a number", str: "a string", list: "an array"}.get(type(value), "an object")


def _parquet_row_count(path: Path) -> int | None:
    """From the file's footer; None where it is no parquet file, which load_dataset then reports."""
    import pyarrow.parquet  # only for a parquet file: datasets brings it, not every command needs it

    try:
        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    except Exception:  # Arrow raises several types for a bad footer; the reader's own message names the file
        return None


def _cause(err: BaseException) -> str:
    """The first line of the innermost exception: datasets wraps the parser's message in "An error occurred while
    generating the dataset", which says nothing about the file."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _json_fault(path: Path) -> str | None:
    """The first line of a JSON-lines file that does not parse, found with Python's own parser, reading one line at
    a time (the file may be a whole corpus; Arrow's row numbers count from 0 within a block). None for any other
    file, or where every line parses: the parser's own message says the rest."""
    if path.suffix != ".jsonl":
        return None
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        return f"line {number} is not valid JSON: {err.msg} at column {err.colno}"
                    # Python's parser takes an escaped half of a surrogate pair ("\ud800") alone; Arrow's does not,
                    # and said "Trailing data" at the end of line 1.
                    if (
                        "\\u" in line
                        and chat_format.clean_text(as_text := json.dumps(row, ensure_ascii=False)) != as_text
                    ):
                        return (
                            f"line {number} holds a lone surrogate escape (\\udXXX without its pair): not valid text"
                        )
    except (UnicodeDecodeError, OSError):
        pass
    return None


def _checked_docs(name: str, values, column: str) -> Iterator[str]:
    """A column's non-blank texts, in order. A value neither text nor null (a number, a list) is refused: it used to
    be dropped without a word."""
    for row, doc in enumerate(values, 1):
        if doc is not None and not isinstance(doc, str):
            fail(f"{name}: row {row}: field '{column}' must be text, got {type(doc).__name__}")
        if doc and doc.strip():
            yield doc


def _column_values(rows, column: str) -> Iterator:
    for batch in rows.select_columns([column]).iter(batch_size=1000):
        yield from batch[column]


def _iter_rows(name: str, rows, text_column: str, validation_fraction: float):
    if text_column not in rows.column_names:
        fail(f"{name}: no '{text_column}' column (columns: {', '.join(rows.column_names)}); set --text_column")
    n_docs = sum(1 for _ in _checked_docs(name, _column_values(rows, text_column), text_column))
    if not n_docs:
        fail(f"{name}: no text found in column '{text_column}'")
    cut = int(n_docs * (1 - validation_fraction))
    if validation_fraction > 0 and cut == n_docs and n_docs > 1:
        cut -= 1  # keep at least one held-out row (as _split)
    index = 0
    for doc in _column_values(rows, text_column):
        if isinstance(doc, str) and doc.strip():
            yield ("train" if index < cut else "validation"), doc, True
            index += 1


def _iter_stream(source: TextSource, text_column: str, validation_fraction: float):
    rows = load_hub_dataset(*source.dataset[:3], streaming=True)
    every = round(1 / validation_fraction) if validation_fraction > 0 else 0
    index = 0
    for row in rows:
        if text_column not in row:
            fail(
                f"{source.name} --streaming: no '{text_column}' column (columns: {', '.join(row)}); set --text_column"
            )
        doc = row[text_column]
        if isinstance(doc, str) and doc.strip():
            yield ("validation" if every and index % every == every - 1 else "train"), doc, True
            index += 1
    if not index:
        fail(f"{source.name} --streaming: no text found in column '{text_column}'")
