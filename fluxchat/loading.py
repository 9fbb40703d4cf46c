"""Finding and loading a trained model, the one way every consumer does it (generate, evaluate, chat, app).

Strict on purpose: safetensors weights only and never `trust_remote_code` (the app may be pointed at a
Hub id someone else chose); a folder that is broken (half-written weights, a tokenizer the model cannot
embed) is one clear line, not a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import huggingface_hub.constants
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

from fluxchat import chat_format, runs
from fluxchat.cli import fail

logger = logging.getLogger("fluxchat")


def resolve_model(value: str | None, flag: str = "model") -> str:
    """A model folder as is; a run folder -> its most aligned finished stage; else a Hub id.
    None -> the newest finished run under runs/. `flag`: the option's name, or an environment variable's
    (FLUXCHAT_MODEL: upper case), as errors name it."""
    said = flag if flag.isupper() else f"--{flag}"
    if not value:
        newest = newest_run_model()
        if newest is None:
            fail(
                f"no model given and no finished run under {runs.runs_dir()}/: pass a model folder, a run folder "
                "or a Hub id (e.g. --model runs/demo/ppo), or train one first (see README)"
            )
        return str(newest)
    path = Path(value)
    if path.is_dir():
        if runs.holds_model(path):
            return str(path)
        stage = runs.latest_stage(path)
        if stage is None:
            fail(
                f"{said} {path}: neither a model folder (no config.json) nor a run folder with a finished pretrain/sft/ppo/grpo/dpo stage"
            )
        # A later stage still training (or stopped) is passed over: said, or its figures would pass for this one's.
        later = runs.CHAT_STAGES[: runs.CHAT_STAGES.index(stage.name)]
        if unfinished := [name for name in later if (path / name).is_dir()]:
            print(f"note: {', '.join(unfinished)} in {path} not finished: using {stage}", file=sys.stderr)
        return str(stage)
    if runs.looks_like_hub_id(value):
        return value
    fail(f"{said} {value}: no such folder (give a model folder, a run folder like runs/<name>, or a Hub id)")


def newest_run_model() -> Path | None:
    """The most aligned finished stage of the most recently finished run under runs/."""
    root = runs.runs_dir()
    if not root.is_dir():
        return None
    candidates = [stage for run in root.iterdir() if run.is_dir() and (stage := runs.latest_stage(run)) is not None]
    return max(candidates, key=lambda s: (s / runs.FINISHED_MARKER).stat().st_mtime, default=None)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


# The JSON files AutoTokenizer reads from a folder (config.json too, for the model type).
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def _broken_json(source) -> Path | None:
    """The first of a folder's tokenizer JSON files that does not parse: the errors name none of them."""
    paths = (Path(source) / name for name in TOKENIZER_JSON)  # none is a file when `source` is a Hub id
    return next((path for path in paths if path.is_file() and not runs.readable_json(path)), None)


def _remedy(source: str) -> str:
    """What to do about a source that would not load: a folder here was written by a stage; a Hub id is fetched."""
    if Path(source).exists() or not runs.looks_like_hub_id(str(source)):
        return "re-run the stage that wrote it"
    # `runs/dmeo` (a mistyped run folder) has a Hub id's shape too: say there is no such folder first
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return (
            "no such folder here, and as a Hub id HF_HUB_OFFLINE=1 keeps the Hub out: check the path, fetch the "
            "model where the Hub is reachable, or pass a folder"
        )
    return "no such folder here, and as a Hub id this machine could not fetch it: check the path or the id, the network, and HF_TOKEN for a private model"


def load_tokenizer(source: str, flag: str | None = None):
    """`flag`: the option that named `source` (`--reward_model`), said first in the error."""
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as err:  # a truncated tokenizer.json raises JSON/Rust errors of several types
        where = _broken_json(source) or (Path(source) / "tokenizer.json" if Path(source).is_dir() else source)
        fail(
            f"{f'{flag} {source}: ' if flag else ''}cannot load the tokenizer {where} ({_one_line(err)}): {_remedy(source)}"
        )


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_pickle_only(source: str, flag: str = "model") -> None:
    """A folder whose weights are only a pickle: one line saying why it will not load (unpickling can run code)."""
    folder = Path(source)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(
        p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern) if p.name != "training_args.bin"
    )
    if pickles:
        fail(
            f"--{flag} {source}: its weights are only a pickle ({', '.join(pickles[:3])}); only safetensors weights "
            "load (a pickle can run code when loaded): convert it with transformers' save_pretrained(safe_serialization=True)"
        )


def _architectures(source: str) -> list[str]:
    try:
        return json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):  # a Hub id, or a broken config the loader will name
        return []


def refuse_score_model(source: str, architectures: list[str] | None = None, hint: str = "") -> None:
    """A reward model (a one-score sequence classifier) is no language model: its body under an LM head
    would chat, generate or train as if it were one. Refuse it. `architectures` None: read from its config.json
    (a Hub id, whose config is not here yet, passes; check the loaded model's config then)."""
    if architectures is None:
        architectures = _architectures(source)
    classifiers = [name for name in architectures if name.endswith("ForSequenceClassification")]
    if classifiers:
        fail(
            f"{source} is a reward model ({classifiers[0]}: one score per conversation), not a language model: give "
            f"a pretrain, sft, ppo, grpo or dpo stage's folder, such as runs/<name>/sft{f' {hint}' if hint else ''}"
        )


def refuse_language_model(source: str, architectures: list[str] | None = None) -> None:
    """The other way round: a language model's folder where a reward model is wanted would load with a fresh,
    random score head (transformers makes one) and score noise. Its config.json says which it is (`architectures`
    None: read from the folder; a Hub id passes, and is checked once loaded)."""
    if architectures is None:
        architectures = _architectures(source)
    language_models = [name for name in architectures if name.endswith(("LMHeadModel", "ForCausalLM"))]
    if language_models:
        fail(
            f"{source} is a language model ({language_models[0]}), not a reward model: give a reward stage's folder, "
            "such as runs/<name>/reward (train one with pipeline/reward.py)"
        )


def load_model(source: str, tokenizer=None, reward: bool = False, hint: str = ""):
    """A causal LM (or, `reward=True`, a one-logit sequence classifier). LoRA adapter folders are merged
    into their base model. With `tokenizer`, checks that every token id has an embedding. `hint` ends the
    error line that refuses a reward model where a language model is wanted."""
    refuse_pickle_only(source)
    if reward and (Path(source) / "adapter_config.json").is_file() and not (Path(source) / "config.json").is_file():
        # A reward stage's unmerged LoRA adapter: peft's AutoPeftModelForSequenceClassification fails on the score
        # head saved beside it (a state_dict error); transformers' own adapter loading reads it, as PPO and GRPO do.
        return load_score_model(source, tokenizer, trained_as="--reward_model").eval()
    if reward:  # both before loading: no "unused weights" warnings
        refuse_language_model(source)
    else:
        refuse_score_model(source, hint=hint)
    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per start-up is noise
    held = _HeldLoadReport()
    try:
        if (Path(source) / "adapter_config.json").is_file() and not (Path(source) / "config.json").is_file():
            # peft only for adapter folders: an optional dependency, not needed by a merged model
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

            auto = AutoPeftModelForSequenceClassification if reward else AutoPeftModelForCausalLM
            with held:
                model = auto.from_pretrained(source, use_safetensors=True).merge_and_unload()
        else:
            auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
            with held:
                model = auto.from_pretrained(source, use_safetensors=True, trust_remote_code=False)
    except Exception as err:  # OSError, SafetensorError (half-written weights), ValueError, ...
        weights = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
        where = weights[0] if len(weights) == 1 else source
        fail(
            f"cannot load a model from {where} (only safetensors weights are loaded): {held.mismatch() or _one_line(err)}"
        )
    if reward:  # a Hub id: known only once its config is here, and said before transformers' missing-head table
        refuse_language_model(source, model.config.architectures or [])
    held.release()  # loaded all the same (missing or unused weights): transformers' table is the warning it means
    if not reward:
        refuse_score_model(
            source, model.config.architectures or [], hint
        )  # a Hub id: known only once its config is here
    # A classifier with other labels, or a LoRA adapter of a language model (no config.json to refuse it by).
    if reward and model.config.num_labels != 1:
        fail(
            f"{source} is not a reward model: it has {model.config.num_labels} labels, expected 1 (train one with pipeline/reward.py)"
        )
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        fail(
            f"{source}: the model embeds {model.get_input_embeddings().num_embeddings} tokens but its tokenizer has "
            f"{len(tokenizer)} (vocab_size mismatch): use the tokenizer the model was trained with"
        )
    return model.eval()


def load_model_and_tokenizer(source: str, reward: bool = False, chat: bool = False, hint: str = ""):
    """Tokenizer and model from `source`; `chat` also requires the chat tokens a conversation needs."""
    refuse_pickle_only(source)  # before the tokenizer reads config.json: its warnings would stand above the line
    tokenizer = load_tokenizer(source)
    missing = [t for t in (chat_format.END_OF_TURN, chat_format.END_OF_TEXT) if t not in tokenizer.get_vocab()]
    if chat and missing:
        fail(
            f"{source}: its tokenizer lacks the chat tokens {missing}; use a model trained with this project's tokenizer"
        )
    return load_model(source, tokenizer, reward=reward, hint=hint), tokenizer


def load_config(source: str):
    """A model's config.json (for its context length) without loading its weights; for a LoRA adapter folder
    (`--no_merge_adapter`, no config.json of its own) its base model's, which the adapter does not change."""
    base = _adapter_base(source)
    try:
        return AutoConfig.from_pretrained(base or source)
    except (OSError, ValueError) as err:
        if base:  # "re-run the stage that wrote it" would write the same folder again
            fail(f"{source} is a LoRA adapter of {base}, whose config cannot be read ({_one_line(err)})")
        fail(f"cannot read the model config in {source} ({_one_line(err)}): {_remedy(source)}")


def _adapter_base(source: str) -> str | None:
    """The base model a LoRA adapter folder names; None for a folder with a config.json of its own or a Hub id."""
    base = (runs.adapter_config(source) or {}).get("base_model_name_or_path")
    return str(base) if base else None


def refuse_replies_past_the_context(max_new_tokens: int, context: int) -> None:
    """Replies are cut at the context anyway: a larger cap would only slow every batch (generate, evaluate)."""
    if max_new_tokens >= context:
        fail(f"--max_new_tokens {max_new_tokens} must be below the model's context of {context} tokens")


def load_chat_tokenizer(path: str, chat_format_name: str | None = None, add_missing_tokens: bool = False):
    """The tokenizer at `path` as a chat tokenizer: our special tokens present, a chat template set,
    and <|end|> as EOS. `chat_format_name` None keeps the format the tokenizer already carries.

    A tokenizer from outside the pipeline (e.g. the Hub's gpt2) lacks our tokens: SFT may add them
    (`add_missing_tokens`; the model's embeddings grow to match in `load_causal_lm`), later stages refuse.
    A format given by a flag that differs from the tokenizer's own is applied with a printed note.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        fail(f"could not load a tokenizer from {_broken_json(path) or path}: {str(err).splitlines()[0][:200]}")
    missing = [t for t in chat_format.SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing and not add_missing_tokens:
        fail(
            f"tokenizer in {path} lacks the chat tokens {' '.join(missing)}: give a model that went through pipeline/sft.py"
        )
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        logger.info(f"added chat tokens {' '.join(missing)} to the tokenizer of {path}")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = chat_format.PAD  # PPO masks on ids != pad: pad must differ from EOS
    own = chat_format.format_of(tokenizer).name
    if chat_format_name and chat_format_name != own and tokenizer.chat_template:
        print(
            f"note: --chat_format {chat_format_name} overrides the '{own}' format the tokenizer in {path} was trained with",
            file=sys.stderr,
        )
    name = chat_format_name or own
    chat_format.set_chat_format(tokenizer, name, chat_model=True)
    tokenizer.padding_side = "right"
    return tokenizer


def context_length(model_or_config) -> int:
    """The model's context in tokens, read from its config (a model or a config object): the one place that knows."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    fail(f"cannot tell the context length of a {type(config).__name__} model")


def context_with_room(source: str, flag: str, reply_tokens: int) -> int:
    """The model's context, refused in one line when `reply_tokens` (PPO's and GRPO's reply limit) leave no room
    for a prompt in it."""
    context = context_length(load_config(source))
    if reply_tokens >= context - 4:
        fail(f"{flag} {reply_tokens} leaves no room for a prompt in the model's context of {context}")
    return context


def _align_config(model, tokenizer) -> None:
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id


def load_causal_lm(path: str, tokenizer):
    model = load_model(path).train()  # no vocab check: _align_config resizes for added chat tokens
    if adapter_task(path) is not None:  # a LoRA adapter folder, merged into its base: peft left the base frozen
        model.requires_grad_(True)
    _align_config(model, tokenizer)
    return count_predicted_tokens(model)


def count_predicted_tokens(model):
    """`model`, with its loss named as the next-token loss it is. GPT2LMHeadModel's class name matches no entry of
    transformers' LOSS_MAPPING, so the Trainer counted every label as a predicted token, the first of each row
    included, which no position predicts: pretraining's losses and bits/byte came out low by (block_size - 1) /
    block_size (0.4% at 256 tokens, half at 2). Named, the Trainer counts `labels[..., 1:]`."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT table while a model loads. A folder whose config.json does not match its
    weights ends in "thus raising an error. For details look at the above report!", so the table would stand above
    our error line: `mismatch()` says its first row in that line instead. A load that succeeds `release()`s it."""

    LOGGER = logging.getLogger("transformers.modeling_utils")
    ROW = re.compile(r"^(\S+)\s*\|.*ckpt: torch\.Size\(\[([^\]]*)\]\) vs model: ?torch\.Size\(\[([^\]]*)\]\)", re.M)

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def __enter__(self):
        self.LOGGER.addFilter(self)

    def __exit__(self, *exc) -> None:
        self.LOGGER.removeFilter(self)

    def mismatch(self) -> str | None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(record.getMessage() for record in self.records))
        rows = self.ROW.findall(text)
        if not rows:
            return None
        key, in_weights, by_config = rows[0]
        more = f" (and {len(rows) - 1} more tensor(s))" if len(rows) > 1 else ""
        return f"config.json does not match the weights: {key} is [{in_weights}] in the weights, [{by_config}] by config.json{more}"

    def release(self) -> None:
        for record in self.records:
            self.LOGGER.handle(record)
        self.records.clear()


def adapter_task(path: str) -> str | None:
    """The task_type of the LoRA adapter a folder holds (CAUSAL_LM, SEQ_CLS), None for a plain model folder."""
    config = runs.adapter_config(path)
    return None if config is None else str(config.get("task_type", "unreadable"))


def load_score_model(path: str, tokenizer, trained_as: str | None = None):
    """A model with one scalar output per sequence (reward or value), read at the last non-pad token.

    The reward stage starts one from a language model, whose score head is new. With `trained_as` (the flag
    that named `path`) the head must come from the folder: a language model's folder would otherwise load
    with a random head, and PPO or GRPO would train against noise without a word.
    """
    # transformers reports a missing score head in a MISSING table, meant as an alarm. Here a new head is the point,
    # or refused in one line (`trained_as`), and anything else amiss is said in one line too.
    task = adapter_task(path)
    if trained_as and task not in (None, "SEQ_CLS"):
        # A language model's LoRA adapter (sft --use_peft --no_merge_adapter) loaded with a fresh random head and no
        # missing key to show it: PPO and GRPO trained against noise, evaluate and the app reported it as a verdict.
        fail(
            f"{trained_as} {path} is a language model's LoRA adapter (task_type {task}), not a reward model: its "
            "score head would start random; give a reward stage's folder (train one with pipeline/reward.py)"
        )
    # A reward (or value) model started from an SFT LoRA adapter: transformers loaded it with the adapter frozen on
    # top, and training failed at the first step (no gradient). Its base model with the adapter merged in instead.
    merged = load_model(path) if task == "CAUSAL_LM" else None
    held = _HeldLoadReport()  # never released: see above
    try:
        with held:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                _adapter_base(path) if merged is not None else path,
                num_labels=1,
                use_safetensors=True,
                output_loading_info=True,
            )
        if merged is not None:
            model.base_model.load_state_dict(merged.base_model.state_dict())
    except Exception as err:  # OSError, SafetensorError (half-written weights), ValueError, ...
        fail(f"could not load a reward model from {path}: {held.mismatch() or _one_line(err)}")
    if trained_as and info["missing_keys"]:
        fail(
            f"{trained_as} {path} is not a reward model: its score head ({', '.join(sorted(info['missing_keys']))}) "
            "would start random; train one with pipeline/reward.py"
        )
    amiss = sorted(k for k in info["missing_keys"] if not k.startswith("score.")) + sorted(info["unexpected_keys"])
    if amiss:
        print(
            f"note: {path}: weights missing from the folder or not used by the model: {', '.join(amiss)}",
            file=sys.stderr,
        )
    _align_config(model, tokenizer)
    return model


def check_same_tokenizer(tokenizer, other_path: str, what: str, against: str = "the policy") -> None:
    """A model scoring another's replies reads them as that model's token ids: with another tokenizer (even one of the
    same size, trained on another corpus) every score is noise."""
    other = load_tokenizer(other_path, what)  # a mistyped path was OSError's traceback
    if other.get_vocab() != tokenizer.get_vocab():
        fail(f"{what} {other_path} uses a different tokenizer than {against}: train it from the same SFT model")


def device_of(model):
    return next(model.parameters()).device
