"""Token shards (fluxchat/shards.py): the ids of today's in-memory tokenization, a cache that is reused when
valid and rebuilt (never used) when half-written, corrupt or built by another tokenizer, and bad data input."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from fluxchat import data, loading, pretraining, shards
from pipeline import pretrain
from tests.conftest import SHAKESPEARE, TINY_MODEL_FLAGS, run_main

TRICKY = 'Tab\there, the literal text <|endoftext|> and <|user|>, "quotes", café, 東京, emoji 🎉, trailing   '


@pytest.fixture
def corpus(tmp_path):
    """A folder of several formats: a .txt with CRLF line ends and control-token spellings, a .jsonl
    (with empty and non-text rows) and a .parquet."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")
    one_line = " ".join(text[:8_000].split())  # no line breaks: cut at spaces
    (folder / "a.txt").write_bytes((text[:30_000].replace("\n", "\r\n") + TRICKY + one_line).encode("utf-8"))
    rows = [{"text": line} for line in text[30_000:45_000].split("\n\n")] + [{"text": "   "}, {"text": None}]
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    pd.DataFrame({"text": text[45_000:60_000].split("\n\n")}).to_parquet(folder / "c.parquet")
    return folder


def _build(tok, cache, sources, log=None, threads=2):
    lines = [] if log is None else log
    return shards.load_or_build(tok, sources, "text", 0.1, cache, threads=threads, log=lines.append)


def test_shards_hold_the_ids_of_tokenize_documents(tiny_run, corpus, tmp_path, monkeypatch):
    tok = loading.load_tokenizer(str(tiny_run / "tokenizer"))
    # Small pieces, read chunks and batches: pieces cross chunk boundaries, many batches.
    monkeypatch.setattr(pretraining, "PIECE_CHARS", 300)
    monkeypatch.setattr(data, "READ_CHUNK", 1000)
    monkeypatch.setattr(shards, "TASK_CHARS", 4000)
    train_docs, val_docs = data.load_text([str(corpus)], None)
    sources = data.text_sources([str(corpus)], None)
    parallelism = []  # what tokenizers' switch for its Rust threads said at each batch
    encode = shards._encode
    monkeypatch.setattr(
        shards, "_encode", lambda b: parallelism.append(os.environ["TOKENIZERS_PARALLELISM"]) or encode(b)
    )
    rayon_threads = os.environ.get("RAYON_NUM_THREADS")
    for threads in (1, 2):  # one thread, and the tokenizer's Rust threads splitting each batch
        parallelism.clear()
        got = _build(tok, tmp_path / f"cache{threads}", sources, threads=threads)
        assert len(parallelism) > 10 and set(parallelism) == {"true" if threads > 1 else "false"}
        # As it was (the tests' "false"), and "false" where the user set nothing: no fork warning after a build.
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        assert os.environ.get("RAYON_NUM_THREADS") == rayon_threads
        assert got.train.dtype == np.uint16 and isinstance(got.train, np.memmap)
        assert got.train.tolist() == pretraining.tokenize_documents(tok, train_docs).tolist()
        assert got.validation.tolist() == pretraining.tokenize_documents(tok, val_docs).tolist()
        assert got.validation_bytes == sum(len(d.encode("utf-8")) for d in val_docs)
        assert got.manifest["threads"] == threads


def test_cache_is_reused_and_a_bad_one_is_rebuilt(tiny_run, tmp_path):
    tok = loading.load_tokenizer(str(tiny_run / "tokenizer"))
    sources = data.text_sources([str(SHAKESPEARE)], None)
    cache = tmp_path / "cache"
    first = _build(tok, cache, sources)
    reference = first.train.tolist()
    folder = first.folder
    log: list[str] = []
    again = _build(tok, cache, sources, log)
    assert again.folder == folder and len(log) == 1 and "tokenized" not in log[0], log  # reused, not re-tokenized

    def rebuilt_because(damage, reason):
        damage()
        lines: list[str] = []
        got = _build(tok, cache, sources, lines)
        assert any(reason in line and "rebuilding" in line for line in lines), lines
        assert any("tokenized" in line for line in lines), lines
        assert got.train.tolist() == reference and shards.check(folder, got.manifest["fingerprint"]) is None

    manifest = folder / "manifest.json"
    rebuilt_because(lambda: manifest.unlink(), "half-written")  # a build killed before its manifest
    rebuilt_because(lambda: manifest.write_text("{not json"), "unreadable manifest")

    def flip_a_byte():
        raw = bytearray((folder / "train.bin").read_bytes())
        raw[1000] ^= 0xFF
        (folder / "train.bin").write_bytes(raw)

    rebuilt_because(flip_a_byte, "does not match its checksum")
    rebuilt_because(lambda: (folder / "validation.bin").write_bytes(b"\0" * 10), "wrong size")

    def other_tokenizer():
        found = json.loads(manifest.read_text())
        found["fingerprint"]["tokenizer_sha256"] = "0" * 64
        manifest.write_text(json.dumps(found))

    rebuilt_because(other_tokenizer, "another tokenizer")
    # A build killed mid-way leaves a temporary folder: removed, never read.
    abandoned = cache / f".tmp-{folder.name}-999999999-deadbeef"
    abandoned.mkdir()
    manifest.unlink()
    _build(tok, cache, sources)
    assert not abandoned.exists() and sorted(p.name for p in cache.iterdir()) == [folder.name]


def test_another_tokenizer_or_a_changed_corpus_gets_its_own_cache(tiny_run, tmp_path):
    tok = loading.load_tokenizer(str(tiny_run / "tokenizer"))
    text = tmp_path / "t.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    cache = tmp_path / "cache"
    first = _build(tok, cache, data.text_sources([str(text)], None))
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:10_000], encoding="utf-8")
    second = _build(tok, cache, data.text_sources([str(text)], None))
    assert second.folder != first.folder and len(second.train) < len(first.train)


def test_bad_data_input_is_one_line(tiny_run, tmp_path):
    base = [
        "--preset",
        "tiny",
        "--tokenizer_name_or_path",
        tiny_run / "tokenizer",
        "--output_dir",
        tmp_path / "out",
        "--max_steps",
        2,
        *TINY_MODEL_FLAGS,
    ]
    code, err = run_main(pretrain.main, [*base, "--dataset_name", "no-such-user/no-such-dataset"])
    assert code == 2 and err.startswith("--dataset_name no-such-user/no-such-dataset") and "could not load" in err
    # A local dataset folder (what `load_dataset` reads offline) with rows that have no "text" column
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("\n".join(json.dumps({"content": f"line {i}", "id": i}) for i in range(20)))
    code, err = run_main(pretrain.main, [*base, "--dataset_name", folder, "--dataset_config_name", "no-such-config"])
    assert code == 2 and "--dataset_config_name no-such-config" in err and "could not load" in err
    code, err = run_main(pretrain.main, [*base, "--dataset_name", folder, "--streaming"])
    assert code == 2 and "no 'text' column (columns: content, id)" in err and "--streaming" in err
    code, err = run_main(pretrain.main, [*base, "--train_file", SHAKESPEARE, "--streaming"])
    assert code == 2 and "--streaming" in err and "--dataset_name" in err
    # A cache that cannot be made (HOME=/proc or a read-only home, as containers have): it was a traceback
    cache = "/proc/fluxchat-cache"
    code, err = run_main(pretrain.main, [*base, "--train_file", SHAKESPEARE, "--token_cache_dir", cache])
    assert (code, err) == (
        2,
        f"token cache {cache}: cannot write there (No such file or directory): pass --token_cache_dir, or set "
        "FLUXCHAT_CACHE, to a writable folder with room",
    )
    assert not (tmp_path / "out").exists()


def test_streamed_dataset_trains_from_shards(tiny_run, tmp_path):
    """--streaming --dataset_name: rows tokenized as they arrive; every 10th document held out."""
    folder = tmp_path / "rows"
    folder.mkdir()
    paragraphs = SHAKESPEARE.read_text(encoding="utf-8")[:60_000].split("\n\n")
    for part in range(3):
        rows = paragraphs[part::3]
        (folder / f"part-{part}.jsonl").write_text("\n".join(json.dumps({"content": p}) for p in rows))
    out = tmp_path / "out"
    code, err = run_main(
        pretrain.main,
        [
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            tiny_run / "tokenizer",
            "--output_dir",
            out,
            "--max_steps",
            3,
            *TINY_MODEL_FLAGS,
            "--dataset_name",
            folder,
            "--streaming",
            "--text_column",
            "content",
            "--eval_strategy",
            "no",
            "--sample_max_new_tokens",
            2,
        ],
    )
    assert code == 0, err
    (cache,) = (tmp_path / "cache" / "tokens").glob("*/manifest.json")
    manifest = json.loads(cache.read_text())
    n = manifest["documents"]
    assert (
        n["validation"] == (n["train"] + n["validation"]) // 10 and manifest["fingerprint"]["sources"][0]["streaming"]
    )
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3


def test_a_folder_trains_its_visible_files_once_each_and_the_log_names_them(tiny_run, tmp_path, capsys):
    """A Jupyter autosave copy in `.ipynb_checkpoints/` was read as a third corpus (its held-out tail then trained on
    as the original's text), a file named and inside its folder was read twice, and nothing said which files."""
    folder = tmp_path / "corpus"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / ".git").mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    (folder / "plays.txt").write_text(text, encoding="utf-8")
    (folder / ".ipynb_checkpoints" / "plays-checkpoint.txt").write_text(text[:50_000], encoding="utf-8")
    (folder / ".git" / "notes.txt").write_text("not a corpus\n" * 100, encoding="utf-8")
    (folder / ".draft.txt").write_text("hidden\n" * 100, encoding="utf-8")
    output = tmp_path / "out"
    argv = [
        *("--preset", "tiny", "--tokenizer_name_or_path", tiny_run / "tokenizer", "--output_dir", output),
        *("--max_steps", 1, "--eval_strategy", "no", "--token_cache_dir", tmp_path / "cache", *TINY_MODEL_FLAGS),
        *("--train_file", folder, folder / "plays.txt"),
    ]
    code, err = run_main(pretrain.main, argv)
    assert code == 0, err
    assert f"note: --train_file: {folder / 'plays.txt'} is named more than once; read once" in capsys.readouterr().err
    assert json.loads((output / "metrics.json").read_text())["sources"] == [str(folder / "plays.txt")]
    assert f"tokens from {folder / 'plays.txt'}, " in (output / "train.log").read_text()
    assert data.describe_sources([data.TextSource(f"{n}.txt", "txt") for n in "abcde"]) == (
        "5 files: a.txt, b.txt, c.txt and 2 more"
    )
    only_hidden = tmp_path / "hidden"
    (only_hidden / ".ipynb_checkpoints").mkdir(parents=True)
    (only_hidden / ".ipynb_checkpoints" / "x.txt").write_text(text, encoding="utf-8")
    code, err = run_main(pretrain.main, [*argv[:-3], "--train_file", only_hidden, "--output_dir", tmp_path / "o2"])
    assert (code, err) == (
        2,
        f"--train_file {only_hidden}: folder has no .txt/.jsonl/.json/.parquet files (hidden ones left out)",
    )
