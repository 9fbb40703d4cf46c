"""Sample text from a trained model, with the KV cache.

    python pipeline/generate.py runs/demo/pretrain --prompt "To be, or not to be" --max_new_tokens 200
    python pipeline/generate.py runs/demo/pretrain --prompt "ROMEO:" --temperature 0.7 --top_k 40 --num_samples 3
    python pipeline/generate.py runs/demo --interactive          # a run folder: its most aligned finished stage

Plain continuation, no chat template: for conversations use pipeline/chat.py.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field

from fluxchat import chat_format, generation, loading
from fluxchat.cli import fail, run_cli, terminal_output
from fluxchat.config import parse_config


@dataclass
class GenerateArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model folder, run folder or Hub id (also the first bare argument)."}
    )
    prompt: str = field(default="\n", metadata={"help": "Text to continue."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens to generate; default 200 or half the model's context, whichever is less."},
    )
    temperature: float = field(default=0.8, metadata={"help": "Softmax temperature; 0 (or below 0.001) = greedy."})
    top_k: int = field(default=50, metadata={"help": "Sample among the k most likely tokens (0 = all)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = off)."})
    num_samples: int = field(default=1, metadata={"help": "Independent samples to print."})
    seed: int = field(default=1337, metadata={"help": "Random seed: the same seed gives the same text."})
    interactive: bool = field(default=False, metadata={"help": "Prompt loop: each line you type is continued."})

    def __post_init__(self):
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {self.num_samples}")
        # Accepted and ignored before: the loop continues what is typed, and greedy decoding gives one text
        if self.interactive and self.prompt != "\n":
            raise ValueError("--prompt and --interactive: give one (--interactive continues each line typed)")
        if self.num_samples > 1 and self.temperature < generation.GREEDY_BELOW:
            raise ValueError(
                f"--num_samples {self.num_samples} with greedy decoding (--temperature {self.temperature:g}) gives the same text each time: sample at a temperature above 0"
            )
        # One flag and its value per line (nan is refused as no finite number, after these).
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be >= 0, got {self.top_k}")


def main(argv: list[str] | None = None) -> list[str]:
    args, _ = parse_config("generate", (GenerateArguments,), argv, positional="model_name_or_path")
    # Invalid UTF-8 in the prompt (argv decodes it to lone surrogates) or on stdin becomes U+FFFD, never a traceback.
    args.prompt = chat_format.clean_text(args.prompt)
    if isinstance(sys.stdin, io.TextIOWrapper):  # not a test's StringIO
        sys.stdin.reconfigure(errors="replace")
    if not args.model_name_or_path:
        fail("give a model: python pipeline/generate.py runs/<name>/pretrain --prompt '...'")
    if not args.interactive and not args.prompt.strip() and args.prompt != "\n":
        fail("--prompt is only whitespace: give some text to continue (or omit --prompt to start from a newline)")
    model, tokenizer = loading.load_model_and_tokenizer(
        loading.resolve_model(args.model_name_or_path, "model_name_or_path")
    )
    context = loading.context_length(model)
    if args.max_new_tokens is None:  # the default adapts to small contexts
        args.max_new_tokens = min(200, context // 2)
    loading.refuse_replies_past_the_context(args.max_new_tokens, context)
    # Temperature 0 is greedy (generation_config): sampling settings set to None beside it made transformers warn
    # that `temperature` "may be ignored", as if the flag had been dropped.
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}

    def continue_text(prompt: str) -> list[str]:
        seen = context - args.max_new_tokens  # generation.sample keeps the prompt's end: a sliding window
        if (n_tokens := len(chat_format.encode_text(tokenizer, prompt))) > seen:
            print(f"note: the prompt is {n_tokens} tokens; the model sees its last {seen}", file=sys.stderr)
        texts = []
        for i in range(args.num_samples):
            text = generation.sample(model, tokenizer, prompt, args.max_new_tokens, seed=args.seed + i, **sampling)
            print(chat_format.visible_text(prompt + text), flush=True)  # a byte-level model can emit ESC
            if args.num_samples > 1:
                print("-" * 40, flush=True)
            texts.append(text)
        return texts

    with terminal_output():
        if not args.interactive:
            return continue_text(args.prompt)
        print("type a prompt and press enter (empty line or Ctrl-D quits)", file=sys.stderr)
        outputs = []
        for line in sys.stdin:
            if not line.strip():
                break
            outputs += continue_text(chat_format.clean_text(line.rstrip("\n")).lstrip("\ufeff"))  # a file's BOM
        return outputs


if __name__ == "__main__":
    run_cli(main)
