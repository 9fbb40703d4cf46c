"""Model cards: the README.md of every stage folder, which is also the stage's Hub model card.

    python pipeline/cards.py runs/demo/sft            # rewrite one card (every stage writes its own)

A card holds YAML metadata the Hub understands (license, library_name, pipeline_tag, base_model,
datasets, tags), what the stage did and with which settings, its metrics and loss curve, where it
sits in the lineage tokenizer -> pretrain -> sft -> reward -> ppo, and how to load it and chat.
Everything comes from files the stage already wrote (config.yaml, metrics.json, log_history.json or
the newest checkpoint's trainer_state.json), so a card can be rewritten at any time: push.py does
so with the Hub repo names filled in. A card never fails a finished training: missing or broken
files leave their section out.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import constants

from fluxchat import runs
from fluxchat.config import scrub_secrets
from fluxchat.runs import CARD_FILE, PLOT_FILE

DEFAULT_LICENSE = "mit"

# The model a stage starts from, when the run's own folders are used (ppo's policy starts from sft;
# its reward model is a side input). pretrain is trained from scratch: on the Hub `base_model` means
# "derived from those weights", which a tokenizer has none of, so pretrain links its tokenizer in
# the lineage section only.
PARENT_STAGE = {"sft": "pretrain", "reward": "sft", "ppo": "sft", "grpo": "sft", "dpo": "sft"}

WHAT_IT_DID = {
    "tokenizer": (
        "Trains a tokenizer with the `tokenizers` library on raw text, with fluxchat's special tokens "
        "(`<|endoftext|>`, `<|pad|>`, `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`) and the chat "
        "template baked in, so `AutoTokenizer` and `apply_chat_template` work anywhere."
    ),
    "pretrain": (
        "Pretrains a GPT-2-style causal language model from scratch with the transformers `Trainer`: "
        "next-token prediction on random windows of raw text, validated in bits per byte so tokenizers "
        "of different granularity compare. A base model: it continues text, it does not follow a chat."
    ),
    "sft": (
        "Supervised fine-tuning with TRL's `SFTTrainer`: the pretrained model learns the chat format on "
        "conversations rendered with the tokenizer's chat template, with the loss on the assistant's turns."
    ),
    "reward": (
        "Trains a reward model with TRL's `RewardTrainer`: the SFT model with a scalar head "
        "(`GPT2ForSequenceClassification`, one label), taught to score the chosen reply of a preference "
        "pair above the rejected one."
    ),
    "ppo": (
        "Aligns the SFT model with PPO (TRL's `PPOTrainer`): it samples replies to prompts, the reward "
        "model scores them, and a KL penalty keeps the policy close to the SFT model it started from."
    ),
    "grpo": (
        "Aligns the SFT model with GRPO (TRL's `GRPOTrainer`): it samples a group of replies per prompt, scores "
        "them with verifiable rewards (the built-in tasks' exact checkers or a prompt file's answers, a format "
        "reward, optionally a reward model), and raises the replies that beat their group's mean, with a KL "
        "penalty to the SFT model it started from."
    ),
    "dpo": (
        "Aligns the SFT model with DPO (TRL's `DPOTrainer`): on preference pairs it raises the likelihood of the "
        "chosen reply over the rejected one relative to a frozen copy of the SFT model, with no reward model "
        "and no sampling."
    ),
}

# Metrics most worth reading come first in the table, in this order; the rest follow alphabetically.
HEADLINE_PATTERNS = ("bits_per_byte", "accuracy", "margin", "reward", "score", "kl", "loss", "bytes_per_token")
HIDDEN_METRICS = {"ranks"}  # per-process bookkeeping, not a result

KEY_SETTINGS = (
    "tokenizer_type",
    "vocab_size",
    "split_digits",
    "chat_format",
    "n_layer",
    "n_embd",
    "n_head",
    "block_size",
    "max_length",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "assistant_only_loss",
    "response_length",
    "kl_coef",
    "num_ppo_epochs",
    "num_mini_batches",
    "beta",
    "use_peft",
    "lora_r",
    "seed",
)

# Our shared data files and where they come from on the Hub (for the card's `datasets`).
KNOWN_DATASETS = {
    "tinyshakespeare": "karpathy/tiny_shakespeare",
    "tiny_shakespeare": "karpathy/tiny_shakespeare",
    "self-instruct": "yizhongw/self_instruct",
    "dolly": "databricks/databricks-dolly-15k",
    "hh-rlhf": "Anthropic/hh-rlhf",
}

# The licences of the datasets a card can name: the card's own `license` is the project's, and a model trained on
# share-alike data (dolly) must say so (../shared/data/README.md and licenses/ hold the sources).
DATASET_LICENSES = {
    "karpathy/tiny_shakespeare": "public domain text (published under MIT in karpathy/char-rnn)",
    "yizhongw/self_instruct": "Apache-2.0",
    "databricks/databricks-dolly-15k": "CC BY-SA 3.0: a model trained on it carries its share-alike terms",
    "Anthropic/hh-rlhf": "MIT",
}

# Curves worth plotting, in log_history keys: losses left, what PPO/reward training optimise right.
LOSS_SERIES = (
    ("loss", "train loss"),
    ("eval_loss", "eval loss"),
    ("loss/policy_avg", "policy loss"),
    ("loss/value_avg", "value loss"),
)
OBJECTIVE_SERIES = (
    ("objective/rlhf_reward", "RLHF reward"),
    ("objective/scores", "reward-model score"),
    ("objective/kl", "KL to reference"),
    ("eval_accuracy", "eval accuracy"),
    ("eval_margin", "eval margin"),
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_log_history(stage_dir: Path) -> list[dict]:
    """The Trainer's log history: log_history.json if the stage wrote one, else the newest checkpoint's."""
    history = _read_json(stage_dir / runs.LOG_HISTORY_FILE)
    if isinstance(history, dict):
        history = history.get("log_history")
    if not isinstance(history, list):
        checkpoint = runs.latest_checkpoint(stage_dir)
        state = _read_json(checkpoint / runs.TRAINER_STATE_FILE) if checkpoint else None
        history = state.get("log_history") if isinstance(state, dict) else None
    return [entry for entry in history or [] if isinstance(entry, dict)]


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts become `parent/child` keys (TRL's style); short lists of numbers are kept as text;
    lists of records (per-rank bookkeeping) are left out."""
    flat: dict[str, Any] = {}
    if not isinstance(metrics, dict):
        return flat
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key in HIDDEN_METRICS:
            continue
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, list):
            if value and len(value) <= 10 and all(isinstance(v, (int, float, str)) for v in value):
                flat[name] = ", ".join(_format_value(v) for v in value)
        elif value is None or isinstance(value, (int, float, str, bool)):
            flat[name] = value
    return flat


def _headline_rank(key: str) -> int:
    # Whole words between `_`/`/` only: "lossless_round_trip" is not a loss.
    words = f"_{key.replace('/', '_')}_"
    return next((i for i, pattern in enumerate(HEADLINE_PATTERNS) if f"_{pattern}_" in words), len(HEADLINE_PATTERNS))


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics_table(metrics: dict[str, Any]) -> str:
    flat = flatten_metrics(metrics)
    if not flat:
        return ""
    ordered = sorted(flat, key=lambda k: (_headline_rank(k), k))
    rows = [f"| `{key}` | {_format_value(flat[key])} |" for key in ordered]
    return "\n".join(["| metric | value |", "|---|---:|", *rows])


def plot_loss_curve(history: list[dict], path: Path) -> bool:
    """Train/eval loss against step (and, for reward/PPO, what they optimise) as a PNG. False if nothing to plot."""

    def series(key):
        points = [(e["step"], e[key]) for e in history if isinstance(e.get(key), (int, float)) and "step" in e]
        return points if points else None

    losses = [(label, s) for key, label in LOSS_SERIES if (s := series(key))]
    objectives = [(label, s) for key, label in OBJECTIVE_SERIES if (s := series(key))]
    panels = [(title, lines) for title, lines in (("loss", losses), ("objectives", objectives)) if lines]
    if not panels:
        return False
    # matplotlib only when there is a curve to draw: heavy, and a card must not need it to load
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The object API on an Agg canvas: no pyplot global state, safe in any process or thread.
    figure = Figure(figsize=(6 * len(panels), 4), dpi=100)
    canvas = FigureCanvasAgg(figure)
    for i, (title, lines) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), i)
        for label, points in lines:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=label)
        axes.set_xlabel("step")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        canvas.print_png(handle)
    os.replace(tmp, path)
    return True


DATA_KEYS = ("train_file", "dataset_name", "dataset", "corpus_file", "mix_text_file")


def _config_datasets(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(Hub dataset ids for the metadata, local file names for the text) from the data flags in the config."""
    hub_ids: list[str] = []
    local: list[str] = []
    for key, value in config.items():
        # The flags that name text a stage read; not dataset_split ("train"), TRL's dataset_text_field ("text")...
        if key not in DATA_KEYS or not value:
            continue
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str):
                continue
            name = Path(item).name
            known = next((hub for pattern, hub in KNOWN_DATASETS.items() if pattern in name.lower()), None)
            if known:
                hub_ids.append(known)
            elif "dataset" in key and runs.looks_like_hub_id(item):
                hub_ids.append(item)
            else:
                local.append(name)
    return list(dict.fromkeys(hub_ids)), list(dict.fromkeys(local))


def infer_base_model(stage_dir: Path, config: dict[str, Any]) -> str | None:
    """A Hub id the stage started from, when its config names one (e.g. --model_name_or_path gpt2-org/x)."""
    adapter = _read_json(stage_dir / "adapter_config.json")
    candidates = [adapter.get("base_model_name_or_path")] if isinstance(adapter, dict) else []
    candidates.append(config.get("model_name_or_path"))
    for value in candidates:
        if isinstance(value, str) and runs.looks_like_hub_id(value):
            return value
    return None


def foreign_parent(stage_dir: Path, stage: str, config: dict[str, Any]) -> str | None:
    """The model a stage was trained from when it is not its run's own parent stage (`--model_name_or_path` naming
    another run's folder or a Hub id), else None. push.py then names no sibling as its `base_model`: an SFT trained
    from another run's pretrain was published as based on this run's."""
    if stage not in PARENT_STAGE:
        return None
    value = config.get("model_name_or_path") or config.get("sft_model_path")
    if not isinstance(value, str) or not value:
        return None  # the default: the run's own parent stage
    parent = Path(stage_dir).parent / PARENT_STAGE[stage]
    try:
        same = Path(value).exists() and Path(value).resolve() == parent.resolve()
    except OSError:
        same = False
    # A relative path from where the stage ran, read from elsewhere: runs/<run>/<parent> is still the parent.
    same = same or Path(value).parts[-2:] == parent.parts[-2:]
    return None if same else value


def hub_url(repo_id: str) -> str:
    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def _lineage(stage_dir: Path, stage: str, lineage_repos: dict[str, str]) -> str:
    run_folder = stage_dir.parent
    rows = []
    for other in runs.STAGES:
        folder = run_folder / other
        if other in lineage_repos:
            where = f"[{lineage_repos[other]}]({hub_url(lineage_repos[other])})"
        elif other == stage:
            where = "this folder"
        elif runs.is_finished(folder):
            where = f"`../{other}`"
        else:
            where = "not run yet" if not folder.exists() else "unfinished"
        name = f"**{other}** (this card)" if other == stage else other
        rows.append(f"| {name} | {where} |")
    chain = " → ".join(f"**{s}**" if s == stage else s for s in runs.STAGES)
    return "\n".join([chain, "", "| stage | where |", "|---|---|", *rows])


def _usage(stage: str, model_id: str) -> str:
    commands = f"```bash\npython pipeline/chat.py {model_id}\npython app.py --model {model_id}\n```"
    if stage == "tokenizer":
        return (
            "```python\nfrom transformers import AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")\n'
            'print(tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True))\n'
            "```"
        )
    if stage == "reward":
        return (
            "```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")\n'
            f'model = AutoModelForSequenceClassification.from_pretrained("{model_id}")\n'
            'conversation = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 equals 5."}]\n'
            'input_ids = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=False)\n'
            "print(model(input_ids).logits[0, 0].item())  # higher = a better reply\n```"
        )
    if stage == "pretrain":
        generate = (
            'inputs = tokenizer("ROMEO:\\n", return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=32)\n"
            "print(tokenizer.decode(output[0], skip_special_tokens=True))\n"
        )
        note = "A base model continues text; for a conversation use the sft or ppo stage. The chat commands still run:\n\n"
    else:
        generate = (
            'messages = [{"role": "user", "content": "What is the capital of France?"}]\n'
            'input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)\n'
            "output = model.generate(input_ids, max_new_tokens=32)  # sampling settings: generation_config.json\n"
            "print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))\n"
        )
        note = "Chat in the terminal or in the browser (from a fluxchat checkout):\n\n"
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}")\n'
        f"{generate}```\n\n{note}{commands}"
    )


def _facts(metrics: dict[str, Any]) -> list[str]:
    facts = []
    if isinstance(metrics.get("parameters"), int):
        facts.append(f"{metrics['parameters']:,} parameters")
    steps = metrics.get("global_step") or metrics.get("step")
    if isinstance(steps, int):
        facts.append(f"{steps:,} optimizer steps")
    seconds = metrics.get("train_wall_seconds") or metrics.get("train_runtime")
    resumed = metrics.get("resumed_from_step")
    if isinstance(seconds, (int, float)):
        since = f" since the resume at step {resumed:,}" if isinstance(resumed, int) else ""
        facts.append(f"{seconds:,.0f} s of training{since}")
    return facts


def _settings_table(config: dict[str, Any]) -> str:
    keys = [k for k in KEY_SETTINGS if config.get(k) not in (None, "", [])]
    if isinstance(config.get("max_steps"), int) and config["max_steps"] > 0 and "num_train_epochs" in keys:
        keys.remove("num_train_epochs")  # max_steps wins over epochs in the Trainer
    if not keys:
        return ""
    return "\n".join(["| setting | value |", "|---|---|", *[f"| `{k}` | {_format_value(config[k])} |" for k in keys]])


def card_metadata(
    stage: str, config: dict[str, Any], base_model: str | None, hub_datasets: list[str], adapter: bool
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"license": config.get("license") or DEFAULT_LICENSE}
    metadata["library_name"] = "peft" if adapter else "transformers"
    if stage == "reward":
        metadata["pipeline_tag"] = "text-classification"
    elif stage != "tokenizer":
        metadata["pipeline_tag"] = "text-generation"
    if base_model:
        metadata["base_model"] = base_model
    if hub_datasets:
        metadata["datasets"] = hub_datasets
    metadata["tags"] = ["fluxchat", "gpt2", stage]
    return metadata


def _stage_report(location: Path) -> str | None:
    """The run's report.md (fluxchat/report.py) when this folder holds the stage it calls final."""
    report = _read_json(location.parent / "report.json")
    if not isinstance(report, dict) or report.get("final_stage") != location.name:
        return None
    try:
        return (location.parent / "report.md").read_text(encoding="utf-8").strip()
    except OSError:
        return None


def write_model_card(
    stage_dir: str | Path,
    stage: str,
    base_model: str | None = None,
    *,
    repo_id: str | None = None,
    lineage_repos: dict[str, str] | None = None,
    location: str | Path | None = None,
) -> Path:
    """Write <stage_dir>/README.md (and loss_curve.png when there is a training log); returns the card's path.

    `base_model`: the Hub repo this stage was trained from (push.py passes the previous stage's repo);
    without it, a Hub id in the config's model_name_or_path is used. `repo_id`: where the card will live
    on the Hub (used in the loading snippet). `lineage_repos`: stage -> Hub repo, linked in the lineage.
    `location`: the folder the stage will end up in, when the card is written while it is built elsewhere.
    """
    stage_dir = Path(stage_dir)
    location = Path(location) if location else stage_dir
    config = runs.read_config(stage_dir)
    metrics = _read_json(stage_dir / runs.METRICS_FILE)
    metrics = metrics if isinstance(metrics, dict) else {}
    if stage == "tokenizer":
        stats = _read_json(stage_dir / runs.TOKENIZER_STATS_FILE)
        metrics = {**(stats if isinstance(stats, dict) else {}), **metrics}
    adapter = (stage_dir / "adapter_config.json").is_file()
    base_model = base_model or infer_base_model(stage_dir, config)
    hub_datasets, local_files = _config_datasets(config)
    run_name = config.get("run_name") or location.parent.name
    model_id = repo_id or str(location)

    try:
        plotted = plot_loss_curve(read_log_history(stage_dir), stage_dir / PLOT_FILE)
    except Exception as err:  # a plotting problem must never fail a finished training
        print(f"note: no loss curve for {stage_dir}: {type(err).__name__}: {err}", file=sys.stderr)
        plotted = False

    metadata = card_metadata(stage, config, base_model, hub_datasets, adapter)
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    lines += [
        f"# fluxchat {stage}: {run_name}",
        "",
        WHAT_IT_DID.get(stage, f"The `{stage}` stage of a fluxchat run."),
        "",
    ]
    facts = _facts(metrics)
    if facts:
        lines += ["This model: " + ", ".join(facts) + ".", ""]
    if base_model:
        lines += [f"Trained from [{base_model}]({hub_url(base_model)}).", ""]
    elif source := foreign_parent(stage_dir, stage, config):
        lines += [f"Trained from `{source}`, not this run's {PARENT_STAGE[stage]} stage.", ""]
    if hub_datasets or local_files:
        data = [f"[{d}]({hub_url('datasets/' + d)})" for d in hub_datasets] + [f"`{f}`" for f in local_files]
        lines += ["Data: " + ", ".join(data) + ".", ""]
        licenses = [f"{d}: {DATASET_LICENSES[d]}" for d in hub_datasets if d in DATASET_LICENSES]
        if licenses:
            lines += ["Data licences: " + "; ".join(licenses) + ".", ""]
    lines += ["## Lineage", "", _lineage(location, stage, lineage_repos or {}), ""]

    lines += ["## Results", ""]
    table = metrics_table(metrics)
    lines += [table if table else "No metrics recorded (metrics.json is missing).", ""]
    stage_report = _stage_report(location)
    if stage_report:
        lines += [
            "### Stage report",
            "",
            "Every stage of this run on the same held-out items (`pipeline/evaluate.py RUN --report`):",
            "",
            stage_report,
            "",
        ]
    if plotted:
        lines += [f"![training curves]({PLOT_FILE})", ""]
    elif stage != "tokenizer":
        lines += ["No training log found for a loss curve.", ""]

    lines += ["## How to use", "", _usage(stage, model_id), ""]

    lines += ["## Training configuration", ""]
    settings = _settings_table(config)
    if settings:
        lines += [settings, ""]
    if config:
        full = yaml.safe_dump(config, sort_keys=True, allow_unicode=True).strip()
        lines += [
            "<details><summary>Full resolved configuration (config.yaml)</summary>",
            "",
            "```yaml",
            full,
            "```",
            "",
            "</details>",
            "",
        ]
    else:
        lines += ["No config.yaml found.", ""]
    lines += [
        "## Limitations",
        "",
        "A small model trained with fluxchat as a learning exercise: it knows little, "
        "gets facts wrong and makes things up. Do not rely on its answers.",
        "",
    ]
    card = stage_dir / CARD_FILE
    runs.atomic_write_text(card, scrub_secrets("\n".join(lines)))
    return card


def stage_of(stage_dir: Path) -> str:
    """The stage a folder holds: its markers say so, else its folder name."""
    return runs.marked_stage(stage_dir) or Path(stage_dir).name
