"""Finding and loading a trained model, the one way every consumer does it (generate, evaluate, chat, app).

Strict on purpose: safetensors weights only and never `trust_remote_code` (the app may be pointed at a
Hub id someone else chose); a folder that is broken (half-written weights, a tokenizer the model cannot
embed) is one clear line, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import runs
from pipeline.config import fail


def resolve_model(value: str | None, flag: str = "model") -> str:
    """A model folder as is; a run folder -> its most aligned finished stage; else a Hub id.
    None -> the newest finished run under runs/."""
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
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return str(path)
        stage = runs.latest_stage(path)
        if stage is None:
            fail(f"--{flag} {path}: neither a model folder (no config.json) nor a run folder with a finished pretrain/sft/ppo stage")
        return str(stage)
    if runs.looks_like_hub_id(value):
        return value
    fail(f"--{flag} {value}: no such folder (give a model folder, a run folder like runs/<name>, or a Hub id)")


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


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as err:  # a truncated tokenizer.json raises JSON/Rust errors of several types
        where = Path(source) / "tokenizer.json" if Path(source).is_dir() else source
        fail(f"cannot load the tokenizer {where} ({_one_line(err)}): re-run the stage that wrote it")


def load_model(source: str, tokenizer=None, reward: bool = False):
    """A causal LM (or, `reward=True`, a one-logit sequence classifier). LoRA adapter folders are merged
    into their base model. With `tokenizer`, checks that every token id has an embedding."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per start-up is noise
    try:
        if (Path(source) / "adapter_config.json").is_file() and not (Path(source) / "config.json").is_file():
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

            auto = AutoPeftModelForSequenceClassification if reward else AutoPeftModelForCausalLM
            model = auto.from_pretrained(source, use_safetensors=True).merge_and_unload()
        else:
            auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
            model = auto.from_pretrained(source, use_safetensors=True, trust_remote_code=False)
    except Exception as err:  # OSError, SafetensorError (half-written weights), ValueError, ...
        weights = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
        where = weights[0] if len(weights) == 1 else source
        fail(f"cannot load a model from {where} (only safetensors weights are loaded): {_one_line(err)}")
    if reward and model.config.num_labels != 1:  # e.g. a language model's folder: a fresh, random 2-label head
        fail(f"{source} is not a reward model: it has {model.config.num_labels} labels, expected 1 (train one with pipeline/reward.py)")
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        fail(
            f"{source}: the model embeds {model.get_input_embeddings().num_embeddings} tokens but its tokenizer has "
            f"{len(tokenizer)} (vocab_size mismatch): use the tokenizer the model was trained with"
        )
    return model.eval()


def load_model_and_tokenizer(source: str, reward: bool = False):
    tokenizer = load_tokenizer(source)
    return load_model(source, tokenizer, reward=reward), tokenizer
