"""Train our own tokenizer with the `tokenizers` library: byte-level BPE (default), word or char.

    python tokenizer/train.py --config configs/tiny/tokenizer.yaml --run_name demo
    python tokenizer/train.py --train_file my_corpus.txt --tokenizer_type char --run_name chars

Writes runs/<run_name>/tokenizer/ (`AutoTokenizer.from_pretrained` loads it) with the special tokens
and the chat template baked in, plus tokenizer_stats.json (bytes per token on held-out text).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from fluxchat import cards, chat_format, runs
from fluxchat.arguments import TokenizerArguments
from fluxchat.cli import fail, run_cli
from fluxchat.config import parse_config
from fluxchat.data import load_text

# Above any model's vocabulary (GPT-2 50,257; Llama 3 128,256; Gemma 262,144). The trainers allocate for the size
# asked before reading a word: 2^31 aborted the process in a Rust out-of-memory backtrace, 1e20 overflowed.
MAXIMUM_VOCAB_SIZE = 1 << 20


# A word vocabulary too small for its corpus still trains (every rare word one <|unk|>; the final line always says
# how many): past half of the held-out tokens the chat can neither read nor write most of its text, so a note says so.
UNKNOWN_NOTE_FRACTION = 0.5


def minimum_vocab_size(tokenizer_type: str) -> int:
    specials = len(chat_format.SPECIAL_TOKENS)
    return specials + 2 if tokenizer_type == "word" else specials + 256 + 1  # 256 byte symbols


# How often the chat format's headers are counted for a word vocabulary: more than any word a vocabulary of a
# few hundred drops, so they are always kept.
HEADER_REPEATS = 10_000


def build_backend(args: TokenizerArguments, texts: list[str]):
    # only once the inputs are checked
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(chat_format.SPECIAL_TOKENS)
    digits = [pre_tokenizers.Digits(individual_digits=True)] if args.split_digits else []
    if args.tokenizer_type == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(digits + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=args.vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
    elif args.tokenizer_type == "char":
        # One token per character, the most frequent ones; anything else falls back to its UTF-8 bytes
        # (<0xNN> tokens), so any text round-trips. BPE with no merges is exactly a char model.
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        room = args.vocab_size - len(specials) - len(byte_tokens)
        counts = Counter(ch for text in texts for ch in text)
        chars = [ch for ch, _ in counts.most_common() if ch not in byte_tokens][:room]
        vocab = {token: i for i, token in enumerate(specials + byte_tokens + chars)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    else:
        # word: a word with the space before it is one token (" capital"), as are a punctuation mark, a digit, a run
        # of spaces (but the last, which goes with the word after it, as in GPT-2's split) and a newline; decoding
        # joins them as they are, so only words outside the vocabulary are lost
        # (one <|unk|> each). Dropping the spaces and putting single ones back on decoding wrote "590,000" as
        # "5 9 0, 0 0 0" and "Porto-Novo" as "Porto - Novo": no answer with a number could ever be scored right.
        tok = Tokenizer(models.WordLevel(unk_token=chat_format.UNK))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            digits + [pre_tokenizers.Split(Regex(r"\n| ?\w+| ?[^\w\s]|[^\S\n]+(?!\S)|[^\S\n]+"), behavior="isolated")]
        )
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(
            vocab_size=args.vocab_size, special_tokens=specials + [chat_format.UNK], show_progress=False
        )
        # The chat format's plain-text headers ("### Response:") must be words of the vocabulary: a corpus without
        # them rendered every turn's header as <|unk|> x4, and the model could not tell whose turn it was.
        fmt = chat_format.FORMATS[args.chat_format]
        headers = [piece for parts in (*fmt.prefix.values(), *fmt.end.values()) for piece in parts]
        headers = "".join(piece + fmt.separator for piece in headers if piece not in specials)
        tok.train_from_iterator([*texts, *([headers] * HEADER_REPEATS if headers.strip() else [])], trainer=trainer)
    tok.add_special_tokens(specials)  # marks them special (never split, skippable on decode)
    return tok


def wrap(backend, args: TokenizerArguments):
    # transformers' tokenizer classes load only once there is a tokenizer to wrap, after the inputs are checked
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=chat_format.END_OF_TEXT,
        eos_token=chat_format.END_OF_TEXT,
        pad_token=chat_format.PAD,
        unk_token=chat_format.UNK if args.tokenizer_type == "word" else None,
        extra_special_tokens=[chat_format.SYSTEM, chat_format.USER, chat_format.ASSISTANT, chat_format.END_OF_TURN],
        clean_up_tokenization_spaces=False,
    )
    return chat_format.set_chat_format(tokenizer, args.chat_format)


def compression_stats(tokenizer, texts: list[str], tokenizer_type: str) -> dict:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ids = [chat_format.encode_text(tokenizer, t) for t in texts]
    n_tokens = sum(len(i) for i in ids)
    stats = {
        "heldout_bytes": n_bytes,
        "heldout_tokens": n_tokens,
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
    }
    if tokenizer_type == "word":  # what a word vocabulary loses: the held-out words it maps to <|unk|>
        stats["unknown_token_fraction"] = round(
            sum(i.count(tokenizer.unk_token_id) for i in ids) / max(n_tokens, 1), 4
        )
    stats["lossless_round_trip"] = all(tokenizer.decode(i) == t for i, t in zip(ids, texts))
    return stats


def main(argv: list[str] | None = None) -> Path:
    args, config_file = parse_config("tokenizer", (TokenizerArguments,), argv)
    if args.vocab_size < minimum_vocab_size(args.tokenizer_type):
        fail(
            f"--vocab_size {args.vocab_size} is too small for a {args.tokenizer_type} tokenizer: it needs at least "
            f"{minimum_vocab_size(args.tokenizer_type)} (alphabet + {len(chat_format.SPECIAL_TOKENS)} special tokens)"
        )
    if args.vocab_size > MAXIMUM_VOCAB_SIZE:
        fail(f"--vocab_size {args.vocab_size} is too large: at most {MAXIMUM_VOCAB_SIZE:,}")
    runs.check_run_name(args.run_name)
    output_dir = Path(args.output_dir) if args.output_dir else runs.stage_dir(args.run_name, "tokenizer")
    runs.check_output_dir(output_dir, overwrite=args.overwrite, stage="tokenizer")
    train_texts, heldout_texts = load_text(
        args.train_file, args.dataset_name, args.text_column, args.validation_fraction
    )
    tokenizer = wrap(build_backend(args, train_texts), args)
    stats = compression_stats(tokenizer, heldout_texts or train_texts[-1:], args.tokenizer_type)
    stats.update(tokenizer_type=args.tokenizer_type, vocab_size=len(tokenizer))
    if len(tokenizer) < args.vocab_size:  # the model's embedding follows the tokenizer, so say which size it gets
        unit = {"bpe": "merges", "char": "distinct characters", "word": "distinct words"}[args.tokenizer_type]
        print(
            f"note: --vocab_size {args.vocab_size:,} asked, but the corpus has too few {unit} for it: the vocabulary "
            f"has {len(tokenizer):,} tokens",
            file=sys.stderr,
        )
    if stats.get("unknown_token_fraction", 0) > UNKNOWN_NOTE_FRACTION:
        print(
            f"note: {stats['unknown_token_fraction']:.0%} of the held-out text's tokens are {chat_format.UNK}: the model will "
            f"never see or say those words (raise --vocab_size, or use --tokenizer_type bpe, which has no unknown)",
            file=sys.stderr,
        )

    work = runs.begin(
        output_dir, "tokenizer", overwrite=args.overwrite
    )  # output_dir, or a sibling swapped in at the end
    staged = runs.staging_dir(work, "final")
    with runs.save_errors(staged, "the tokenizer"):
        tokenizer.save_pretrained(staged)
        runs.publish(staged, work)  # renamed into place whole, as every stage's outputs are
    runs.save_resolved_config(work / runs.CONFIG_FILE, args, config_file=config_file)
    runs.write_json(work / runs.TOKENIZER_STATS_FILE, stats)
    cards.write_model_card(work, "tokenizer", location=output_dir)
    runs.mark_finished(work, "tokenizer", **stats)
    runs.commit(work, output_dir)
    if args.tokenizer_type == "word":  # lossless only where the held-out text holds no word outside its vocabulary
        round_trip = (
            "lossless on the held-out text (a word outside the vocabulary would become <|unk|>)"
            if stats["lossless_round_trip"]
            else f"lossy (word, {stats['unknown_token_fraction']:.1%} of tokens unknown)"
        )
    else:
        round_trip = "lossless" if stats["lossless_round_trip"] else "LOSSY"
    print(
        f"tokenizer: {args.tokenizer_type}, {len(tokenizer)} tokens, {stats['bytes_per_token']} bytes/token on held-out "
        f"text, round trip {round_trip} -> {output_dir}"
    )
    return output_dir


if __name__ == "__main__":
    run_cli(main)
