"""Language-model pieces for pretraining: token packing, the GPT-2 model, bits per byte, samples."""

from __future__ import annotations

import collections
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

from fluxchat import chat_format, generation, loading
from fluxchat.cli import fail

logger = logging.getLogger("fluxchat")


def tokenize_documents(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one token stream in memory, each followed by <|endoftext|> (pretraining reads token
    shards instead, fluxchat.shards: exactly these ids, on disk).

    `split_special_tokens=True`: a corpus that contains the literal text "<|endoftext|>" is data,
    not a document boundary. A long document is encoded in pieces (see `_pieces`): the same ids,
    without holding a whole-corpus Encoding (offsets, token strings) that costs ~200 MB per 1 MB of text.
    """
    eos = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TEXT)
    splits_after_newline = _splits_after_newline(tokenizer)
    ids: list[int] = []
    for doc in documents:
        for piece in _pieces(doc) if splits_after_newline else [doc]:
            ids += chat_format.encode_text(tokenizer, piece)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


PIECE_CHARS = 1 << 16
# After a lone newline between two non-space characters: "...thee.\nROMEO". Byte-level BPE (GPT-2's
# regex), word and character pre-tokenizers all cut there, so no token spans it.
_CUT = re.compile(r"(?<=\S\n)(?=\S)")
# Before a single space between two non-space characters: "thee| ROMEO" (the space starts the next word's
# token). For text without line breaks (one 3 MB line): a piece never grows past 2 * PIECE_CHARS.
_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")


def _splits_after_newline(tokenizer) -> bool:
    """Whether this tokenizer's pre-tokenizer always cuts at _CUT, so encoding in pieces changes nothing
    (a tokenizer that can merge a newline with the next word, e.g. SentencePiece-style, is encoded whole)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return False
    ends = {end for _, (_, end) in backend.pre_tokenizer.pre_tokenize_str("ab.\nCD 1\nx ab cd")}
    return {4, 9, 13} <= ends  # after the newlines, and before " cd" (_SPACE_CUT)


def _pieces(text: str):
    """`text` in pieces of PIECE_CHARS to 2 * PIECE_CHARS characters, cut where the pre-tokenizer cuts anyway
    (a line break, else a space), so the ids are those of the whole text; only a run of 2 * PIECE_CHARS
    characters with neither is cut where it stands (a token may differ there: no real text has one)."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = _piece_end(text, start)
        yield text[start:end]
        start = end
    yield text[start:]


def _piece_end(text: str, start: int) -> int:
    """Where the piece starting at `start` ends. It reads only text[start : start + 2 * PIECE_CHARS] (the
    search stops there), so a stream with that much buffered cuts exactly where the whole text is cut."""
    low, high = start + PIECE_CHARS, start + 2 * PIECE_CHARS
    cut = _CUT.search(text, low, high) or _SPACE_CUT.search(text, low, high)
    return cut.start() if cut else min(high, len(text))


class RandomWindows(torch.utils.data.Dataset):
    """Every offset of the token stream is a sample, as nanoGPT's `get_batch` draws them.

    `tokens` is a tensor or a (memory-mapped) numpy array: a window reads only its own pages. The order
    comes from `WindowSampler` (the Trainer uses it for this dataset): random offsets that depend only on
    the seed, the epoch and the position in it, so `--resume` continues at the same data position.
    """

    def __init__(self, tokens, block_size: int, accounting: RankAccounting | None = None):
        if len(tokens) <= block_size:
            fail(
                f"training text is only {len(tokens)} tokens, shorter than one block ({block_size}): add text or lower --block_size"
            )
        self.tokens, self.block_size, self.accounting = tokens, block_size, accounting
        self._fd = None  # token shards: windows are read with pread, see _read

    def __len__(self):
        return len(self.tokens) - self.block_size

    def __getitem__(self, i):
        window = self._read(i)
        if self.accounting is not None:
            self.accounting.record(i, len(window))
        return {"input_ids": window, "labels": window}

    def _read(self, i: int) -> torch.Tensor:
        """The window at offset i as int64. From a memory-mapped shard it is read with pread rather than through
        the map: every page a random window touches through the map (plus the kernel's fault-around, ~64 KB)
        would stay mapped and count in the process's RSS until the whole file did; pread leaves the data in
        the page cache, where it is shared and reclaimable, and the process's memory stays flat."""
        tokens = self.tokens
        if not isinstance(tokens, np.memmap):
            return tokens[i : i + self.block_size]
        if self._fd is None:
            self._fd = os.open(tokens.filename, os.O_RDONLY)
        size = tokens.dtype.itemsize
        raw = os.pread(self._fd, self.block_size * size, tokens.offset + i * size)
        return torch.from_numpy(np.frombuffer(raw, dtype=tokens.dtype).astype(np.int64))

    def __getstate__(self):  # a file descriptor does not travel to a spawned worker: it opens its own
        return {**self.__dict__, "_fd": None}


class WindowSampler(torch.utils.data.Sampler):
    """`n` random offsets in [0, n) per epoch, drawn with replacement as nanoGPT's get_batch does.

    Each epoch's draws come from a generator seeded by (seed, epoch), in chunks: no permutation of a
    billion offsets is ever held (torch's RandomSampler would build one). The data position is therefore
    (epoch, samples taken), which the Trainer saves in every checkpoint and restores on resume by skipping
    the batches already taken: the resumed run sees exactly the windows the uninterrupted run would.
    """

    CHUNK = 1 << 16

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through accelerate) before each epoch
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for start in range(0, self.n, self.CHUNK):
            yield from rng.integers(0, self.n, size=min(self.CHUNK, self.n - start)).tolist()


class Blocks(RandomWindows):
    """Consecutive non-overlapping blocks: every validation token is scored exactly once."""

    def __len__(self):
        return len(self.tokens) // self.block_size

    def __getitem__(self, i):
        return super().__getitem__(i * self.block_size)


def own_tokenizer(model_source: str | None) -> str | None:
    """The folder of a model to continue, where it holds a tokenizer of its own (every stage saves one)."""
    if model_source and (Path(model_source) / "tokenizer.json").is_file():
        return model_source
    return None


def build_model(model_args, tokenizer) -> GPT2LMHeadModel:
    """A fresh GPT-2 (transformers' init: N(0, 0.02), residual projections scaled by 1/sqrt(2*n_layer))
    or a saved causal LM to continue from. Vocab and special ids always come from our tokenizer."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if model_args.model_name_or_path:
        loading.refuse_pickle_only(model_args.model_name_or_path, "model_name_or_path")
        # load_model: a reward model refused, a LoRA adapter merged, a folder that will not load said in one line
        model = loading.count_predicted_tokens(loading.load_model(model_args.model_name_or_path).train())
        if model.config.vocab_size < len(tokenizer):
            fail(
                f"--tokenizer_name_or_path has {len(tokenizer)} tokens but --model_name_or_path "
                f"{model_args.model_name_or_path} has vocab_size {model.config.vocab_size}: use the tokenizer it was trained with"
            )
        return model
    vocab_size = len(tokenizer)
    multiple = model_args.pad_vocab_to_multiple_of
    if multiple:  # e.g. 50257 -> 50304: matmul-friendly shapes on GPUs
        vocab_size = math.ceil(vocab_size / multiple) * multiple
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=model_args.block_size,
        n_embd=model_args.n_embd,
        n_layer=model_args.n_layer,
        n_head=model_args.n_head,
        resid_pdrop=model_args.dropout,
        embd_pdrop=model_args.dropout,
        attn_pdrop=model_args.dropout,
        # GPT-2's tanh GELU as one fused kernel: the default "gelu_new" is the same formula in eight
        # Python-level ops, each keeping a (batch, context, 4 * n_embd) tensor for backward.
        activation_function="gelu_pytorch_tanh",
        **ids,
    )
    try:
        model = GPT2LMHeadModel._from_config(config, attn_implementation=model_args.attn_implementation)
    except (RuntimeError, MemoryError) as err:  # torch's "can't allocate memory" (ModelArguments checks the body)
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        fail(
            f"cannot allocate the model (--n_layer {model_args.n_layer} --n_embd {model_args.n_embd} --block_size "
            f"{model_args.block_size}, {vocab_size} tokens in the vocabulary): choose a smaller model"
        )
    return loading.count_predicted_tokens(model)


class BitsPerByteTrainer(Trainer):
    """Trainer that reports validation bits per byte next to the loss.

    bits/byte = summed nats over the evaluated tokens / their UTF-8 bytes / ln 2. The validation
    blocks cover the held-out text, so bytes per evaluated token is held-out bytes / held-out tokens;
    runs with different tokenizers become comparable (for ASCII text this is bits per character).
    """

    def __init__(self, *args, bytes_per_token: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_per_token = bytes_per_token

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, RandomWindows):
            return WindowSampler(len(dataset), self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def log(self, logs, *args, **kwargs):
        if "eval_loss" in logs:
            logs["eval_bits_per_byte"] = logs["eval_loss"] / math.log(2) / self.bytes_per_token
        super().log(logs, *args, **kwargs)


class SampleCallback(TrainerCallback):
    """A few fixed prompts sampled after each evaluation, so the log shows the text getting better."""

    def __init__(self, tokenizer, prompts: list[str], max_new_tokens: int):
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not state.is_world_process_zero or not self.prompts or self.max_new_tokens < 1:
            return
        if not math.isfinite((metrics or {}).get("eval_loss", 0.0)):  # diverged: nothing to sample from NaN
            return
        for i, prompt in enumerate(self.prompts):
            text = generation.sample(model, self.tokenizer, prompt, self.max_new_tokens, seed=i)
            logger.info(f"sample @ step {state.global_step} | {prompt!r} -> {text!r}")
            print(f"--- sample @ step {state.global_step}\n{chat_format.visible_text(prompt + text)}\n---", flush=True)


class RankAccounting:
    """What this rank's data loader drew, recorded by the training dataset; gathered at the end to prove
    every data-parallel rank took part (each draws different windows). The loader reads a batch ahead of training, so
    `samples` and `tokens` hold one batch more than was trained on (5 steps of 16: 96 samples), and `last_offsets`
    end on it: they say where the data position is, not what the last step saw."""

    def __init__(self):
        self.samples = 0
        self.tokens = 0
        self.first_offsets: list[int] = []
        self.last_offsets: collections.deque = collections.deque(maxlen=8)  # where the run's data position ended

    def record(self, offset: int, n_tokens: int):
        self.samples += 1
        self.tokens += n_tokens
        if len(self.first_offsets) < 8:
            self.first_offsets.append(offset)
        self.last_offsets.append(offset)

    def summary(self) -> dict:
        return {
            "rank": int(os.environ.get("RANK", 0)),
            "samples": self.samples,
            "tokens": self.tokens,
            "first_offsets": self.first_offsets,
            "last_offsets": list(self.last_offsets),
        }
