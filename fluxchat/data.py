"""Loading text for tokenizer training and pretraining, written once for every source.

Sources: local `.txt` / `.jsonl` / `.json` / `.parquet` files or folders of them, or a Hub dataset id,
all through `datasets`. A `.txt` file is one document (we keep its line breaks); jsonl/parquet rows
are documents read from `text_column`. The held-out split is the last `validation_fraction` of each
text file (nanoGPT's split) or of the rows of a row dataset, so train and validation never overlap.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from fluxchat.config import REPO_ROOT, fail
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


def expand_files(paths: list[str], flag: str = "--train_file") -> list[Path]:
    """Files named directly or found in folders; each must exist and be non-empty."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                fail(f"{flag} {path}: folder has no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                fail(f"{flag} {path}: unsupported file type '{path.suffix}' (use {', '.join(TEXT_SUFFIXES)})")
            files.append(path)
        else:
            fail(f"{flag} {path}: no such file or folder")
    for path in files:
        if path.stat().st_size == 0:
            fail(f"{flag} {path}: file is empty")
        if path.suffix != ".parquet":
            check_utf8(path, flag)
    return files


def check_utf8(path: Path, flag: str) -> None:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        fail(f"{flag} {path}: looks binary (NUL bytes), expected UTF-8 text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        fail(f"{flag} {path}: not UTF-8 text (invalid byte at offset {err.start}); re-encode it as UTF-8")


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
) -> tuple[list[str], list[str]]:
    """(train documents, validation documents) from files, a Hub dataset, or the default corpus."""
    import datasets

    datasets.disable_progress_bars()
    if dataset_name:
        try:
            rows = datasets.load_dataset(dataset_name, split=dataset_split)
        except Exception as err:  # the Hub client raises many types; the user needs one line
            fail(f"--dataset_name {dataset_name}: could not load ({str(err).splitlines()[0][:200]})")
        sources = [("--dataset_name " + dataset_name, rows, False)]
    else:
        files = expand_files(train_files) if train_files else [default_corpus()]
        sources = []
        for path in files:
            if path.suffix == ".txt":
                rows = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
                sources.append((str(path), rows, True))
            else:
                builder = "parquet" if path.suffix == ".parquet" else "json"
                try:
                    rows = datasets.load_dataset(builder, data_files=str(path), split="train")
                except Exception as err:
                    fail(f"{path}: could not be read as {builder} ({str(err).splitlines()[0][:200]})")
                sources.append((str(path), rows, False))
    train, validation = [], []
    for name, rows, is_text_file in sources:
        column = "text" if is_text_file else text_column
        if column not in rows.column_names:
            fail(f"{name}: no '{column}' column (columns: {', '.join(rows.column_names)}); set --text_column")
        docs = [d for d in rows[column] if isinstance(d, str) and d.strip()]
        if not docs:
            fail(f"{name}: no text found in column '{column}'")
        part_train, part_val = _split(docs, validation_fraction, by_chars=is_text_file)
        train += part_train
        validation += part_val
    return train, validation
