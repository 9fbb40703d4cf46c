"""Typed configuration: YAML recipe -> dataclasses, CLI flags override, unknown keys are errors.

Every stage declares its arguments as dataclasses (plus a transformers/TRL training-arguments class)
and calls `parse_config`. The YAML file named by `--config` (or `--preset NAME`, which means
`configs/NAME/<stage>.yaml`) is turned into flags placed *before* the user's flags, so argparse does
the type checking for both and the command line wins. TRL's own parser silently ignores unknown YAML
keys; we refuse them, because a typo in a recipe should not silently train the wrong model.

Errors the user can fix are raised as `UsageError` and printed as one line by `cli.run_cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from fluxchat import validation  # leaf modules (they import nothing of ours): no cycle
from fluxchat.cli import UsageError, fail, main_process

REPO_ROOT = Path(__file__).resolve().parent.parent
# TRL's configs default gradient_checkpointing to True and transformers 5 calls that name deprecated whenever one is
# built, whatever the user set (a recipe's `activation_checkpointing: false` included), and peft asks a model
# `is_gradient_checkpointing`, also deprecated: nothing anyone can act on.
warnings.filterwarnings("ignore", message="`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)
# transformers' generate drops an attention mask of all ones (a batch without padding) and then feeds finished
# replies pad tokens, which makes GPT-2 recommend an attention mask: about generate's own inputs, never ours.
# And GPT-2's class name (GPT2LMHeadModel) names no loss in transformers' table, which then warns that `loss_type=None`
# "was set in the config" (nothing sets it) before using the causal-LM loss: GPT-2's own. And TRL's PPO passes
# generate() both a generation config and two output flags, which transformers 5 calls deprecated.
_NOT_OURS = (
    "We strongly recommend passing in an `attention_mask`",
    "`loss_type=None` was set in the config",
    "Passing `generation_config` together with generation-related arguments",
)
for _name in ("transformers.modeling_utils", "transformers.generation.utils"):
    logging.getLogger(_name).addFilter(lambda record: not any(message in record.getMessage() for message in _NOT_OURS))
CONFIGS_DIR = REPO_ROOT / "configs"


def command_path(relative: str) -> str:
    """A project script (`pipeline/sft.py`) as a command names it: as is from the project folder, by its full path
    from any other, where the relative path would name nothing (or another file)."""
    return relative if Path.cwd().resolve() == REPO_ROOT.resolve() else str(REPO_ROOT / relative)


def presets() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.iterdir() if p.is_dir() and p.name != "accelerate")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# A YAML file's aliases may add at most this many values (nodes) to it: `&a [x, x, ...]` then `[*a, *a, ...]`, a
# few levels deep, is a few hundred bytes that expand to billions (a "billion laughs"), which the argv built from it
# and any error line quoting it would hold in full. The values written out are not counted: the file's size bounds them.
MAX_EXPANDED_NODES = 100_000
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")  # 'value' or "value" (repr's quotes when it holds a ')


def shorten_quoted(message: str) -> str:
    """`message` with each value quoted in it cut short (argparse's and PyYAML's lines quote the user's value in full)."""
    return _QUOTED.sub(lambda m: m[0][0] + validation.short(m[0][1:-1]) + m[0][0], message)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, first_line: int, line: int):
        lines = f"line {line}" if line == first_line else f"lines {first_line} and {line}"  # `{a: 1, a: 2}`: one line
        super().__init__(f"key {validation.short(repr(key))} given twice ({lines})")


class _TooLarge(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no python tags), refusing a key given twice in a mapping, which PyYAML resolves
    silently to the last, and aliases that expand the file beyond MAX_EXPANDED_NODES, before anything is built."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` then a key of its own: an override, as YAML means it
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key (a list): SafeLoader refuses it itself
                    pass
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root) -> None:
    # Each node's size once its aliases are expanded, each distinct node counted once (an alias is the same node
    # object): the expanded size of a billion laughs is counted without expanding it.
    sizes: dict[int, int] = {}
    distinct = 0

    def size(node) -> int:
        nonlocal distinct
        if id(node) in sizes:
            if sizes[id(node)] < 0:  # `&a [*a]`: a value that contains itself
                raise _TooLarge("an alias refers to the value it is in")
            return sizes[id(node)]
        sizes[id(node)] = -1
        distinct += 1
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(key) + size(value) for key, value in node.value)
        sizes[id(node)] = min(total, 2**62)  # capped: the count stays a small int however deep the bomb
        return sizes[id(node)]

    if size(root) - distinct > MAX_EXPANDED_NODES:
        raise _TooLarge(f"its aliases add more than {MAX_EXPANDED_NODES} values to it: write the values out")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error as one line: where (line, column) and what, which its first line alone does not say."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({err.context})" if err.context else ""
        return shorten_quoted(f"{where}{err.problem}{context}")
    lines = str(err).strip().splitlines()
    return shorten_quoted(lines[0] if lines else type(err).__name__)


def load_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        fail(f"config file {path} is a folder: give a YAML file in it (configs/<preset>/<stage>.yaml), or --preset")
    if path.exists() and not path.is_file():  # a FIFO would wait for a writer; a device would never end
        fail(f"config file {path} is not a regular file: give a YAML file")
    if not path.is_file():
        fail(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # a SafeLoader: no python tags
    except (_DuplicateKey, _TooLarge) as err:
        fail(f"{path}: {err}")
    except yaml.YAMLError as err:
        fail(f"config file {path} is not valid YAML: {_yaml_problem(err)}")
    except UnicodeDecodeError as err:
        fail(f"config file {path} is not valid YAML: {err}")
    except RecursionError:  # PyYAML composes nested values recursively
        fail(f"config file {path} is not valid YAML: its values are nested too deeply")
    if data is None:
        return {}
    if not isinstance(data, dict):
        fail(f"config file {path} must be a mapping of key: value, got {type(data).__name__}")
    return data


def pop_flag(argv: list[str], name: str) -> str | None:
    """Remove `--name VALUE` / `--name=VALUE` from argv and return VALUE (the last one wins)."""
    value = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}":
            if i + 1 >= len(argv):
                fail(f"flag --{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return value


def _yaml_to_argv(values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue  # `key: null` keeps the dataclass default
        if isinstance(value, (list, tuple)):
            if not value:
                continue
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _merge_repeated_lists(argv: list[str], parser) -> list[str]:
    """`--stage_args a:--x=1 --stage_args b:--y=2` means both: argparse would keep only the last list given,
    silently. Each list flag's values are gathered where the flag first appears (a scalar's last value still
    wins, as everywhere)."""
    merged: list[str] = []
    lists: dict[str, list[str]] = {}  # flag -> the list its occurrences share
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        action = parser._option_string_actions.get(flag) if argv[i].startswith("--") else None
        if action is None or action.nargs not in ("+", "*"):
            merged.append(argv[i])
            i += 1
            continue
        end = i + 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1
        values = ([inline] if "=" in argv[i] else []) + argv[i + 1 : end]
        if flag in lists:
            lists[flag] += values
        else:
            lists[flag] = values
            merged += [flag, lists[flag]]  # filled in below: later occurrences still add to it
        i = end
    return [arg for item in merged for arg in (item if isinstance(item, list) else [item])]


def _field_names(dataclass_types) -> set[str]:
    return {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init}


# transformers' TrainingArguments help for `run_name` names its logging integrations; here it is the output folder too.
RUN_NAME_HELP = "Outputs go to runs/<run_name>/<stage> unless --output_dir is given (also the run's name for loggers)."


def _explain_in_help(parser, stage: str, preset_help: str | None) -> None:
    """What `--help` lists beside the dataclasses' fields: the recipe flags (taken off argv before parsing, so
    SUPPRESS keeps them out of the parsed namespace), `--no_<switch>` said as turning the switch off (transformers
    repeats the switch's own help on it, which reads as the opposite), and run_name as our commands use it."""
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument(
        "--config",
        metavar="YAML",
        default=argparse.SUPPRESS,
        help="A YAML file of defaults for these flags; flags given here override it.",
    )
    if preset_help is None and any((CONFIGS_DIR / p / f"{stage}.yaml").is_file() for p in presets()):
        preset_help = f"The recipe configs/<preset>/{stage}.yaml ({', '.join(presets())}); instead of --config."
    if preset_help:
        recipe.add_argument("--preset", metavar="NAME", default=argparse.SUPPRESS, help=preset_help)
    for action in parser._actions:
        negated = next((o for o in action.option_strings if o.startswith("--no_")), None)
        if negated and isinstance(action, argparse._StoreFalseAction):
            action.help = f"Turn off --{action.dest} (on by default)."
            action.default = argparse.SUPPRESS  # else "(default: False)"; the switch's own action sets the default
        elif action.dest == "run_name" and (action.help or "").startswith("An optional descriptor"):
            action.help = RUN_NAME_HELP


def _name_the_file(message: str, yaml_values: dict, argv: list[str], config_file: Path | None) -> str:
    """`message` led by the YAML file's name when the flag it blames (the first it names: others may be remedies)
    came from the file, not the command line."""
    cli_keys = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    blamed = re.search(r"--(\w+)", message)
    from_yaml = blamed is not None and blamed[1] in yaml_values and blamed[1] not in cli_keys
    return f"{config_file}: {message}" if from_yaml else message


def parse_config(
    stage: str,
    dataclass_types: tuple[type, ...],
    argv: list[str] | None = None,
    positional: str | None = None,
    preset_help: str | None = None,
):
    """Parse `--config`/`--preset` YAML plus CLI flags into instances of `dataclass_types`.

    `positional`: a field that may also be given as the first bare argument
    (`generate.py runs/demo/pretrain` == `generate.py --model_name_or_path runs/demo/pretrain`).
    `preset_help`: `--preset`'s line in `--help` where the command reads it itself (run_all).
    Returns the instances in order, with `config_file` (Path or None) appended.
    """
    # transformers only when parsing: this module is imported by every command, some of which never need it
    from transformers import HfArgumentParser

    class StrictParser(HfArgumentParser):
        def error(self, message):  # argparse would print usage and exit; we want one line
            raise UsageError(shorten_quoted(message))

    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if positional and argv and not argv[0].startswith("-"):
        if f"--{positional}" in argv or any(a.startswith(f"--{positional}=") for a in argv):
            fail(f"--{positional} given twice: as the first argument ({argv[0]}) and as --{positional}; give one")
        argv = [f"--{positional}", argv[0], *argv[1:]]
    config_arg = pop_flag(argv, "config")
    preset = pop_flag(argv, "preset")
    if config_arg is not None and preset is not None:
        fail("give either --config or --preset, not both")
    config_file = None
    if preset is not None:  # an empty one too: `--preset ''` (an unset shell variable) is no preset
        if preset not in presets():
            fail(f"unknown preset '{preset}'{_did_you_mean(preset, presets())}; choose from {', '.join(presets())}")
        config_file = CONFIGS_DIR / preset / f"{stage}.yaml"
    elif config_arg is not None:
        if not config_arg.strip():
            fail("--config needs a YAML file, got an empty string")
        config_file = Path(config_arg)

    known = _field_names(dataclass_types)
    yaml_values = load_yaml(config_file) if config_file else {}
    for key in yaml_values:
        if key not in known:
            fail(f"{config_file}: unknown key '{validation.short(key)}'{_did_you_mean(str(key), known)}")
    parser = StrictParser(dataclass_types, allow_abbrev=False)
    _explain_in_help(parser, stage, preset_help)
    # Every flag `--help` lists, `--no_<switch>` included (HfArgumentParser adds one for each switch that is on by default)
    flags = {option[2:].replace("-", "_") for option in parser._option_string_actions if option.startswith("--")}
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            if key not in flags:
                fail(f"unknown flag --{validation.short(key)}{_did_you_mean(key, known)}")

    for key, value in yaml_values.items():  # else the extra values surface as "not used by the HfArgumentParser"
        action = parser._option_string_actions.get(f"--{key}")
        # Any list, `[800]` and `[]` too: a one-value key given a list is a mistake, whatever its length
        if isinstance(value, (list, tuple)) and action is not None and action.nargs in (None, "?"):
            fail(f"{config_file}: {key} takes one value, got a list of {len(value)}")
    full_argv = _yaml_to_argv(yaml_values) + _merge_repeated_lists(argv, parser)
    if "use_cpu" in known and on_cpu_only():
        full_argv += _cpu_only_flags(full_argv)
    try:
        parsed = parser.parse_args_into_dataclasses(args=full_argv, look_for_args_file=False)
        validation.check_numbers(
            parsed
        )  # NaN, infinity and out-of-range numbers: one line, before anything is written
        validation.check_report_to(parsed)
    except UsageError as err:
        raise UsageError(_name_the_file(str(err), yaml_values, argv, config_file)) from None
    except (ValueError, TypeError) as err:  # raised by a dataclass __post_init__ validation
        unused = "Some specified arguments are not used by the HfArgumentParser: "
        if str(err).startswith(unused):  # `--learning_rate 1 2`: a flag given more values than it takes
            extra = str(err)[len(unused) :].strip("[]")
            fail(f"unexpected value(s) {validation.short(extra)}: a flag was given more values than it takes")
        # One line, all of it (bounded): transformers lists what it found on the lines after "... but found"
        text = " ".join(str(err).split()) or type(err).__name__
        text = text if len(text) <= 400 else text[:399] + "…"
        # A recipe's `temperature: .nan` said "--temperature must be a finite number" without naming the file
        raise UsageError(_name_the_file(shorten_quoted(text), yaml_values, argv, config_file)) from None
    return (*parsed, config_file)


def _cpu_only_flags(argv: list[str]) -> list[str]:
    """On a CPU-only machine: keep a recipe's `bf16: true` where the CPU multiplies bf16 natively and
    train in fp32 everywhere else (fp16, and bf16 emulated, are slower than fp32 on a CPU; we say so, so
    one recipe runs on both), and set `use_cpu`, without which transformers ignores a torchrun/accelerate
    process group on CPU and every process trains alone (and refuses bf16)."""

    def last_value(flag: str) -> str:
        """The value the parser will take: the last `--flag value`, `--flag=value` or bare `--flag` (true)."""
        where = [i for i, arg in enumerate(argv) if arg == flag or arg.startswith(f"{flag}=")]
        if not where:
            return "false"
        if argv[where[-1]] != flag:  # --bf16=false: it was missed, and the recipe's bf16 trained
            return argv[where[-1]].split("=", 1)[1]
        nxt = argv[where[-1] + 1 : where[-1] + 2]
        return nxt[0] if nxt and not nxt[0].startswith("--") else "true"

    asked = [f for f in ("bf16", "fp16") if last_value(f"--{f}").lower() not in ("false", "f", "0", "no", "n")]
    bf16 = asked == ["bf16"] and cpu_has_native_bf16()
    if asked and not bf16 and main_process():
        why = "this CPU has no native bf16 (AVX512-BF16 or AMX)" if asked == ["bf16"] else "no GPU here"
        print(f"note: {' and '.join(f'--{f}' for f in asked)} ignored: {why}, training in fp32", file=sys.stderr)
    cores, processes = os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ  # its launcher sets this for every child
    if os.environ.get("OMP_NUM_THREADS") == "1" and processes < cores and launched_by_accelerate:
        # `accelerate launch` without --num_cpu_threads_per_process pins its child to one thread; a stage
        # that is one of `processes` on this machine takes its share of the cores instead (all of them when alone).
        import torch

        torch.set_num_threads(cores // processes)
    elif os.environ.get("OMP_NUM_THREADS") == "1" and processes < cores and main_process():
        # Set by the user, or by torchrun for each of several processes: inherited by `python` too, so the
        # remedy is the variable itself
        print(
            f"note: OMP_NUM_THREADS=1, so this process trains on 1 of {cores} CPU cores; to use "
            f"{'them all' if processes == 1 else 'its share'}, set OMP_NUM_THREADS={cores // processes}",
            file=sys.stderr,
        )
    return ["--bf16", str(bf16).lower(), "--fp16", "false", "--use_cpu", "true"]


def to_dict(obj) -> dict[str, Any]:
    if hasattr(obj, "to_dict"):  # TrainingArguments: serialises enums, hides tokens
        return obj.to_dict()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(obj).items()}


# Secret scrubbing, in one place: configs, model cards and Hub error messages all go through these.
SECRET_KEYS = ("token", "hub_token", "push_to_hub_token")
HUB_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")  # Hub access tokens: "hf_" + 34 letters/digits
REDACTED = "<redacted>"


def redact_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flat config with every token-holding key's value replaced by <redacted>."""
    return {k: REDACTED if v and (k in SECRET_KEYS or k.endswith("hub_token")) else v for k, v in values.items()}


def known_tokens() -> list[str]:
    """The Hub tokens this process could use (env or the standard login): never to be written anywhere."""
    values = [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        # huggingface_hub only when a token is looked up: this module is imported by every command, the Hub rarely needed
        from huggingface_hub import get_token

        values.append(get_token())
    except Exception:  # a broken token file must not break a card or an error message
        pass
    return [v for v in values if v and len(v) >= 8]


def scrub_secrets(text: str, *secrets: str | None) -> str:
    """`text` with every Hub token (ours, the ones given, anything token-shaped) replaced by <redacted>."""
    for secret in sorted({s for s in (*secrets, *known_tokens()) if s and len(s) >= 8}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = HUB_TOKEN_PATTERN.sub(REDACTED, text)
    return re.sub(r"(?i)\b(bearer\s+)\S+", rf"\1{REDACTED}", text)


def resolved_config(*objs, config_file: Path | None = None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for obj in objs:
        merged.update(to_dict(obj))
    merged = redact_secrets(merged)  # never write a Hub token to disk
    merged["config_file"] = str(config_file) if config_file else None
    return merged


def on_cpu_only() -> bool:
    import torch  # torch only when asked: this module is imported by commands that never need it

    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products at twice fp32's rate, so autocast pays (tiny pretraining on 2 Zen 4
    cores: 1.2x the tokens/s at the same loss). Without them bf16 is emulated on a CPU and slower than fp32."""
    import torch  # torch only when asked, as in on_cpu_only

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (private, so guarded)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
