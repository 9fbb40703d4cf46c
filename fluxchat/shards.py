"""Pretraining tokens on disk: a corpus tokenized once into memory-mapped token shards, cached by fingerprint.

    <cache>/<key>/train.bin          every training document's ids, each followed by <|endoftext|>
    <cache>/<key>/validation.bin     the same for the held-out documents
    <cache>/<key>/manifest.json      what was tokenized (the fingerprint), counts and sha256 of each file; written last

`key` hashes the fingerprint: the tokenizer (its tokenizer.json), every source (path + size + mtime, or the
dataset's name/config/split) and the split settings, so a changed corpus or tokenizer gets a new folder. A
folder is built under a temporary name and renamed into place whole; on use, a folder without a manifest
(half-written), whose manifest names another tokenizer or corpus, or whose files do not match their sizes
and checksums (corrupt) is rebuilt, never used. Ids are uint16 when the vocabulary fits, else uint32: 2-4
bytes per token on disk and nothing in memory but the pages a batch touches.

Tokenizing runs ~1 MB batches of pieces, in order, through the tokenizer's own Rust threads (`threads` of them), in
this process: a corpus of any size passes through in constant memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from fluxchat import chat_format, data, pretraining
from fluxchat.cli import fail, main_process
from fluxchat.runs import atomic_write_text

FORMAT = 1  # bump when the layout or the tokenization of the shards changes: old caches are then rebuilt
SPLITS = ("train", "validation")
TASK_CHARS = 1 << 20  # characters encoded in one call: pieces enough for every thread, little held in memory


class PieceSplitter:
    """A document fed chunk by chunk comes out as exactly the pieces `pretraining._pieces(whole document)` gives,
    holding at most ~2 * PIECE_CHARS characters plus a chunk (when the tokenizer allows cutting: `cut`)."""

    def __init__(self, cut: bool):
        self.cut, self.buffer = cut, ""

    def feed(self, chunk: str) -> list[str]:
        self.buffer += chunk
        if not self.cut:
            return []
        out, start = [], 0
        while len(self.buffer) - start >= 2 * pretraining.PIECE_CHARS:  # enough buffered to decide as _pieces does
            end = pretraining._piece_end(self.buffer, start)
            out.append(self.buffer[start:end])
            start = end
        self.buffer = self.buffer[start:]
        return out

    def finish(self) -> list[str]:
        rest, self.buffer = self.buffer, ""
        return list(pretraining._pieces(rest)) if self.cut else [rest]


def tokenizer_sha256(tokenizer) -> str:
    """The tokenizer's identity: its tokenizer.json as serialised (vocabulary, merges, added tokens, pre-tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass
class TokenShards:
    """A valid cache folder, memory-mapped: `train` and `validation` are read-only np.memmap arrays."""

    folder: Path
    manifest: dict
    train: np.ndarray = field(repr=False)
    validation: np.ndarray | None = field(repr=False)

    @property
    def validation_bytes(self) -> int:
        return self.manifest["validation_bytes"]

    @property
    def max_id(self) -> int:
        return self.manifest["max_id"]


def fingerprint(tokenizer, sources: list[data.TextSource], text_column: str, validation_fraction: float) -> dict:
    rows = any(s.kind != "txt" for s in sources)
    return {
        "format": FORMAT,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "sources": [s.fingerprint() for s in sources],
        "text_column": text_column if rows else None,  # .txt files have no column: it changes nothing
        "validation_fraction": validation_fraction,
    }


def load_or_build(
    tokenizer,
    sources: list[data.TextSource],
    text_column: str,
    validation_fraction: float,
    cache_root: Path,
    threads: int = 1,
    log=None,
) -> TokenShards:
    """The token shards of `sources`: from the cache when a valid folder is there, else tokenized now."""
    log = log or _print_main
    expected = fingerprint(tokenizer, sources, text_column, validation_fraction)
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_root) / key
    problem = check(folder, expected)
    if problem is None:
        log(f"token cache: {folder} ({_counts(json.loads((folder / 'manifest.json').read_text()))})")
        return open_shards(folder)
    if folder.exists():
        log(f"token cache: {folder} {problem}: rebuilding it")
    data.check_sources(sources)
    try:
        build(tokenizer, sources, text_column, validation_fraction, folder, expected, threads, log)
    except OSError as err:
        where = Path(err.filename) if err.filename is not None else None
        if where is not None and not (where.is_relative_to(cache_root) or Path(cache_root).is_relative_to(where)):
            raise  # not the cache's (nor a folder above it): a source that failed to read, say
        # A home that is read-only, missing or /proc (containers, CI), or a full disk: it ended in a traceback.
        fail(
            f"token cache {cache_root}: cannot write there ({err.strerror or err}): pass --token_cache_dir, or set "
            "FLUXCHAT_CACHE, to a writable folder with room"
        )
    return open_shards(folder)


def _print_main(line: str) -> None:
    if main_process():
        print(line, flush=True)


def _counts(manifest: dict) -> str:
    files = manifest["files"]
    return f"{files['train']['tokens']:,} train / {files['validation']['tokens']:,} validation tokens, {manifest['dtype']}"


def check(folder: Path, expected: dict) -> str | None:
    """None if `folder` is a complete cache of exactly `expected`; else what is wrong with it."""
    manifest_path = folder / "manifest.json"
    if not folder.is_dir():
        return "does not exist"
    if not manifest_path.is_file():
        return "is half-written (no manifest.json)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        found, files, dtype = manifest["fingerprint"], manifest["files"], np.dtype(manifest["dtype"])
    except (ValueError, KeyError, TypeError) as err:
        return f"has an unreadable manifest.json ({type(err).__name__})"
    if found.get("tokenizer_sha256") != expected["tokenizer_sha256"]:
        return "was built by another tokenizer"
    if found != expected:
        return "was built from other sources or settings"
    for split in SPLITS:
        path, want = folder / f"{split}.bin", files.get(split, {})
        if not path.is_file() or path.stat().st_size != want.get("tokens", -1) * dtype.itemsize:
            return f"is corrupt ({path.name} is missing or has the wrong size)"
        if _sha256(path) != want.get("sha256"):
            return f"is corrupt ({path.name} does not match its checksum)"
    return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def open_shards(folder: Path) -> TokenShards:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    dtype = np.dtype(manifest["dtype"])

    def mapped(split: str):
        n = manifest["files"][split]["tokens"]
        return np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r", shape=(n,)) if n else None

    train = mapped("train")
    return TokenShards(folder, manifest, train if train is not None else np.zeros(0, dtype), mapped("validation"))


class _SplitWriter:
    """Appends id arrays to <split>.bin, keeping the count, the largest id and the checksum."""

    def __init__(self, path: Path):
        self.handle, self.hash, self.tokens, self.max_id = open(path, "wb"), hashlib.sha256(), 0, -1

    def write(self, ids: np.ndarray) -> None:
        if len(ids):
            raw = ids.tobytes()
            self.handle.write(raw)
            self.hash.update(raw)
            self.tokens += len(ids)
            self.max_id = max(self.max_id, int(ids.max()))

    def close(self) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        return {"tokens": self.tokens, "sha256": self.hash.hexdigest()}


_WORKER = {}  # the encoder, eos id and dtype of the build in progress


def _fast_encoder(tokenizer) -> Tokenizer:
    """A copy of the tokenizer's Rust backend that encodes as `chat_format.encode_text` does
    (`split_special_tokens=True`: "<|endoftext|>" in the text is text), skipping what transformers adds
    per call (offsets, attention masks, Python-side checks): about 1.5x faster for the same ids."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        fail(f"{type(tokenizer).__name__}: pretraining needs a fast (Rust) tokenizer (a tokenizer.json)")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


def _encode(batch: list[tuple[str, bool]]) -> np.ndarray:
    """Pieces to ids, <|endoftext|> after each piece that ends a document: the ids tokenize_documents gives."""
    backend, eos, dtype = _WORKER["backend"], _WORKER["eos"], _WORKER["dtype"]
    texts = [text for text, _ in batch if text]
    encoded = iter(backend.encode_batch_fast(texts, add_special_tokens=False) if texts else [])
    out: list[int] = []
    for text, ends_document in batch:
        if text:
            out += next(encoded).ids
        if ends_document:
            out.append(eos)
    return np.array(out, dtype=dtype)


def build(
    tokenizer,
    sources,
    text_column: str,
    validation_fraction: float,
    folder: Path,
    expected: dict,
    threads: int = 1,
    log=print,
) -> None:
    """Tokenize every source into a temporary folder next to `folder`, write the manifest last, rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder)
    temp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    start = time.perf_counter()
    try:
        vocab = len(tokenizer)
        dtype = dtype_for(vocab)
        _WORKER.update(
            backend=_fast_encoder(tokenizer), eos=tokenizer.convert_tokens_to_ids(chat_format.END_OF_TEXT), dtype=dtype
        )
        writers = {split: _SplitWriter(temp / f"{split}.bin") for split in SPLITS}
        batches = _batches(sources, text_column, validation_fraction, pretraining._splits_after_newline(tokenizer))
        with _rust_threads(threads):
            stats = _tokenize(batches, writers)
        files = {split: writer.close() for split, writer in writers.items()}
        if files["train"]["tokens"] == 0:
            fail(f"{', '.join(s.name for s in sources)}: no training text")
        seconds = time.perf_counter() - start
        manifest = {
            "fingerprint": expected,
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab,
            "files": files,
            "max_id": max(w.max_id for w in writers.values()),
            "validation_bytes": stats["validation_bytes"],
            "text_bytes": stats["text_bytes"],
            "documents": stats["documents"],
            "threads": threads,
            "seconds": round(seconds, 2),
        }
        atomic_write_text(temp / "manifest.json", json.dumps(manifest, indent=1))  # last: it marks the folder complete
        old = folder.parent / f".old-{folder.name}-{uuid.uuid4().hex[:8]}"
        if folder.exists():
            folder.rename(old)
        temp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        _WORKER.clear()
    megabytes = stats["text_bytes"] / 1e6
    log(
        f"token cache: tokenized {megabytes:,.1f} MB in {seconds:.1f} s ({megabytes / max(seconds, 1e-9):.1f} MB/s, "
        f"{threads} thread(s)) -> {folder} ({_counts(manifest)})"
    )


def _remove_abandoned(folder: Path) -> None:
    """Temporary folders of this key left by a build that was killed (its process is gone)."""
    for temp in folder.parent.glob(f".tmp-{folder.name}-*"):
        pid = int(temp.name.split("-")[2]) if temp.name.split("-")[2].isdigit() else -1
        try:
            os.kill(pid, 0)
        except (OSError, ValueError):
            shutil.rmtree(temp, ignore_errors=True)


def _batches(sources, text_column: str, validation_fraction: float, cut: bool):
    """(split, [(piece, ends_document)], text bytes) batches of about TASK_CHARS characters, in order per split."""
    splitters = {split: PieceSplitter(cut) for split in SPLITS}
    pending: dict[str, list] = {split: [] for split in SPLITS}
    pending_chars = dict.fromkeys(SPLITS, 0)
    for split, chunk, ends_document in data.iter_text(sources, text_column, validation_fraction):
        splitter = splitters[split]
        new = [(piece, False) for piece in splitter.feed(chunk)]
        if ends_document:
            last = splitter.finish()
            new += [(piece, False) for piece in last[:-1]] + [(last[-1], True)]
        pending[split] += new
        pending_chars[split] += len(chunk)
        if pending_chars[split] >= TASK_CHARS:
            yield split, pending[split]
            pending[split], pending_chars[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


@contextmanager
def _rust_threads(threads: int) -> Iterator[None]:
    """Batches encoded by the tokenizer's Rust threads (rayon). Worker processes forked from this one did the job
    until 2026-12-07, no faster on 2 cores (1 GB: 4.47 MB/s against 4.26 with threads; 33.5 MB: 13.7 s against
    10.7), and a fork copies whatever lock this process's other threads (torch's, a test runner's) hold at that
    moment, which a worker then waits on forever: a test run hung that way once."""
    previous = {name: os.environ.get(name) for name in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    if previous["RAYON_NUM_THREADS"] is None:  # read by rayon once per process, when its thread pool starts
        os.environ["RAYON_NUM_THREADS"] = str(max(threads, 1))
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        # Off for the rest of the process unless the user chose: a process forked later (a DataLoader worker) would
        # otherwise print tokenizers' "forked after parallelism has already been used" warning, each of them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tokenize(batches, writers: dict) -> dict:
    stats = {"validation_bytes": 0, "text_bytes": 0, "documents": dict.fromkeys(SPLITS, 0)}
    for split, batch in batches:
        size = sum(len(text.encode("utf-8")) for text, _ in batch)
        stats["text_bytes"] += size
        stats["validation_bytes"] += size if split == "validation" else 0
        stats["documents"][split] += sum(ends for _, ends in batch)
        writers[split].write(_encode(batch))
    return stats


def default_cache_root() -> Path:
    return data.cache_dir() / "tokens"
