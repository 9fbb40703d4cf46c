"""The Hugging Face Hub: pushing a finished stage (or a whole run and its Space), and never leaking the token.

Used by every stage (`--push_to_hub`) and by pipeline/push.py. The token comes from the standard login
or HF_TOKEN and is never printed or written: errors from the Hub are reduced to one line with anything
token-shaped removed, and a folder that contains the token is refused before anything is uploaded.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from fluxchat import cards, runs
from fluxchat.cli import UsageError, fail, main_process
from fluxchat.config import REPO_ROOT, known_tokens, scrub_secrets

# Kept local: resumable-training state (large, useless to a user of the model), our logs (local
# paths, nothing a model user needs: the card has the metrics and curve) and training_args.bin (a
# pickle of TrainingArguments, which can hold --hub_token).
IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/*",
    "*.log",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "*.tmp",
    ".*",
]
# Every file to be uploaded is scanned for the token, binary or not (a pickled .bin/.pt can hold it), in
# chunks of this size so that multi-GB weights never sit in memory whole.
SCAN_CHUNK_BYTES = 16 * 1024 * 1024
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
DEFAULT_GRADIO_VERSION = "6.31.0"


@dataclass(frozen=True)
class PushRequest:
    """A stage's `--push_to_hub` request, taken from the Trainer so that we push once, at the end."""

    repo_id: str
    private: bool = False
    token: str | None = field(default=None, repr=False)  # repr=False: never shown in a log or traceback


def check_repo_id(repo_id: str, flag: str = "repo id") -> None:
    if not isinstance(repo_id, str) or not REPO_ID_PATTERN.fullmatch(repo_id):
        fail(f"{flag} '{repo_id}' must look like <user>/<name> (letters, digits, - _ .)")


def ensure_can_push(token: str | None = None) -> None:
    """Fail in one line, before any work, when a push cannot succeed: offline mode, or no token at all."""
    if constants.is_offline_mode():
        fail(
            "offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1): pushing needs the Hub; set HF_HUB_OFFLINE=0 when online"
        )
    if not (token or get_token()):
        fail("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access")


def one_line_error(err: BaseException, token: str | None = None) -> str:
    """An exception from the Hub client as one line, with every token-shaped string removed."""
    # huggingface_hub 2.4 talks through httpx2 (older releases: httpx); both name the class TransportError.
    if any(cls.__name__ == "TransportError" for cls in type(err).__mro__):  # refused, DNS, timeout, proxy
        message = f"cannot reach {constants.ENDPOINT} ({type(err).__name__}: {err}); check the network, a proxy or HF_ENDPOINT"
    elif isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        detail = err.server_message or str(err).strip().splitlines()[0]
        message = f"the Hub answered {status}: {detail}"
        if status in (401, 403):
            message += " (check the token: `hf auth login` or HF_TOKEN, with write access to this namespace)"
    else:
        lines = [line.strip(" -") for line in str(err).strip().splitlines() if line.strip(" -")]
        message = f"{type(err).__name__}: {'; '.join(lines) or 'no details'}"
    return scrub_secrets(" ".join(message.split()), token)


@contextmanager
def hub_errors(action: str, token: str | None = None):
    try:
        yield
    except UsageError:
        raise
    except Exception as err:  # the client raises HTTP, network, validation and OS errors alike
        raise UsageError(f"{action} failed: {one_line_error(err, token)}") from None


def refuse_leaked_token(folder: Path, token: str | None = None) -> None:
    """Refuse to upload a folder that contains a Hub token in any file that would be uploaded."""
    secrets = {s.encode() for s in [token, *known_tokens()] if s}
    if not secrets:
        return
    relative = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    for name in filter_repo_objects(relative, ignore_patterns=IGNORE_PATTERNS):
        if _holds_any(folder / name, secrets):
            fail(f"{folder / name} contains your Hub token: remove it before pushing (nothing was uploaded)")


def _holds_any(path: Path, secrets: set[bytes]) -> bool:
    """Whether the file's bytes contain a secret, read in chunks that overlap by the longest secret."""
    overlap = max(len(s) for s in secrets) - 1
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(SCAN_CHUNK_BYTES):
            window = tail + chunk
            if any(secret in window for secret in secrets):
                return True
            tail = window[-overlap:] if overlap else b""
    return False


def local_adapter_base(stage_dir: Path) -> Path | None:
    """The local folder a LoRA adapter stage (`--use_peft --no_merge_adapter`) names as its base model, None for a
    merged model or an adapter of a Hub model. Pushed as it is, the adapter loads nowhere that folder is missing."""
    base = str((runs.adapter_config(stage_dir) or {}).get("base_model_name_or_path") or "")
    return Path(base) if base and Path(base).exists() else None


def push_stage(
    stage_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    commit_message: str | None = None,
    *,
    lineage_repos: dict[str, str] | None = None,
    adapter_base_repo: str | None = None,
) -> str:
    """Push a finished stage folder to the model repo `repo_id` (created if needed); returns the repo URL.

    The model card is rewritten first with `base_model` and the Hub names. `token=None` uses the
    standard login or HF_TOKEN. A LoRA adapter whose base is a local folder is pushed with `adapter_base_repo`, the
    repo that folder is pushed to, as its base model.
    """
    stage_dir = Path(stage_dir)
    check_repo_id(repo_id)
    stage = cards.stage_of(stage_dir)
    if not runs.is_finished(stage_dir):
        fail(f"{stage_dir} holds no finished stage (no {runs.FINISHED_MARKER}): finish it before pushing")
    local_base = local_adapter_base(stage_dir)
    if local_base is not None and adapter_base_repo is None:
        fail(
            f"{stage_dir} holds a LoRA adapter whose base model is the local folder {local_base}, which would not be "
            "on the Hub with it: push the whole run folder with pipeline/push.py (its base is pushed and named), or "
            "merge the adapter (the default, --merge_adapter)"
        )
    ensure_can_push(token)
    card = stage_dir / runs.CARD_FILE
    local_card = card.read_text(encoding="utf-8") if card.is_file() else None
    cards.write_model_card(stage_dir, stage, base_model, repo_id=repo_id, lineage_repos=lineage_repos)
    try:
        refuse_leaked_token(stage_dir, token)
        api = HfApi()
        with hub_errors(f"pushing {stage_dir} to {repo_id}", token):
            url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
            api.upload_folder(
                folder_path=stage_dir,
                repo_id=repo_id,
                token=token,
                commit_message=commit_message or f"fluxchat {stage}: upload {stage_dir.parent.name}/{stage}",
                ignore_patterns=IGNORE_PATTERNS + (["adapter_config.json"] if local_base is not None else []),
            )
            if local_base is not None:  # the adapter's base named as the Hub will know it
                config = {**runs.adapter_config(stage_dir), "base_model_name_or_path": adapter_base_repo}
                api.upload_file(
                    path_or_fileobj=(json.dumps(config, indent=2) + "\n").encode(),
                    path_in_repo="adapter_config.json",
                    repo_id=repo_id,
                    token=token,
                    commit_message=f"fluxchat {stage}: the adapter's base model is {adapter_base_repo}",
                )
    except BaseException:
        # Not pushed: the local card goes back to what it was. The Hub's card would link repos that do not exist and
        # tell a reader to load the model from the Hub rather than from this folder.
        if local_card is not None:
            runs.atomic_write_text(card, local_card)
        raise
    return str(url)


def take_over_push(training_args) -> PushRequest | None:
    """Call right after parsing: turns the Trainer's own push off (it would push every checkpoint and
    overwrite our card) and remembers the request for `maybe_push` at the end. Fails early if the push
    could not succeed, rather than after hours of training."""
    token = getattr(training_args, "hub_token", None)
    # Cleared whatever the flags: the Trainer pickles its arguments into training_args.bin (final model and
    # every checkpoint); the token lives on only in our PushRequest, which is never written.
    training_args.hub_token = None
    if not getattr(training_args, "push_to_hub", False):
        return None
    if not training_args.hub_model_id:
        fail("--push_to_hub needs --hub_model_id <user>/<name>: the repo to create or update")
    check_repo_id(training_args.hub_model_id, "--hub_model_id")
    ensure_can_push(token)
    request = PushRequest(training_args.hub_model_id, bool(training_args.hub_private_repo), token)
    training_args.push_to_hub = False
    return request


def maybe_push(push_request: PushRequest | None, stage_dir: str | Path, stage: str) -> str | None:
    """Call after `runs.mark_finished`: pushes the stage if `take_over_push` found a request (main process only)."""
    if push_request is None or not main_process():
        return None
    try:
        url = push_stage(stage_dir, push_request.repo_id, token=push_request.token, private=push_request.private)
    except UsageError as err:
        raise UsageError(
            f"{err} (the {stage} stage itself finished: retry with `python pipeline/push.py` or rerun with the same flags)"
        ) from None
    print(f"pushed {stage} -> {url}")
    return url


def stage_repos(run_folder: Path, hub_user: str) -> dict[str, str]:
    """Every finished stage of a run -> its repo id <hub_user>/<run_name>-<stage>."""
    return {
        stage: f"{hub_user}/{run_folder.name}-{stage}" for stage in runs.STAGES if runs.is_finished(run_folder / stage)
    }


def existing_repos(repos: dict[str, str], token: str | None = None) -> dict[str, str]:
    """Those of `repos` the Hub already holds (pushed by an earlier command)."""
    api = HfApi()
    with hub_errors("checking which of the run's repos are on the Hub", token):
        return {stage: repo for stage, repo in repos.items() if api.repo_exists(repo, token=token)}


def base_repo(stage: str, repos: dict[str, str]) -> str | None:
    """The repo of the nearest finished stage this one was trained from (none for tokenizer/pretrain)."""
    parent = cards.PARENT_STAGE.get(stage)
    while parent is not None and parent not in repos:
        parent = cards.PARENT_STAGE.get(parent)
    return repos.get(parent) if parent else None


def _gradio_version() -> str:
    """The gradio the project pins: the Space's sdk_version must agree with requirements.txt."""
    try:
        pins = (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8")
    except OSError:
        return DEFAULT_GRADIO_VERSION
    match = re.search(r"^gradio==([\w.]+)", pins, re.MULTILINE)
    return match.group(1) if match else DEFAULT_GRADIO_VERSION


SPACE_VARIABLES = ("FLUXCHAT_MODEL", "FLUXCHAT_COMPARE_MODEL", "FLUXCHAT_REWARD_MODEL")  # what app.py reads


def space_variables(repos: dict[str, str]) -> dict[str, str]:
    """The Space variables app.py reads, from the repos that are on the Hub: the best chat model, the model to
    compare it with (SFT, which PPO, GRPO and DPO start from, as app.py picks for a run folder; else the next
    best), the reward model."""
    served = [s for s in runs.CHAT_STAGES if s in repos]  # what the Space serves, best first
    if not served:
        return {}
    variables = {"FLUXCHAT_MODEL": repos[served[0]]}
    if compared := runs.compared_stage(served[0], served):
        variables["FLUXCHAT_COMPARE_MODEL"] = repos[compared]
    if "reward" in repos:
        variables["FLUXCHAT_REWARD_MODEL"] = repos["reward"]
    return variables


def space_readme(variables: dict[str, str], run_name: str) -> str:
    model_repo = variables["FLUXCHAT_MODEL"]
    metadata = {
        "title": f"fluxchat {run_name}"[:60],
        "emoji": "💬",
        "colorFrom": "indigo",
        "colorTo": "blue",
        "sdk": "gradio",
        "sdk_version": _gradio_version(),
        "app_file": "app.py",
        "pinned": False,
        "license": cards.DEFAULT_LICENSE,
        "models": list(dict.fromkeys(variables.values())),
        "tags": ["fluxchat"],
        "short_description": "Chat with a tiny GPT-2 trained from scratch with fluxchat",
    }
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()}\n---\n\n"
        f"# fluxchat: {run_name}\n\n"
        f"Chat with [{model_repo}]({cards.hub_url(model_repo)}), a small GPT-2 trained from scratch "
        "(tokenizer -> pretraining -> SFT -> reward model -> PPO, GRPO, DPO) with fluxchat.\n\n"
        "app.py reads its models from the Space variables (Settings -> Variables and secrets): "
        + ", ".join(f"`{k}` = `{v}`" for k, v in variables.items())
        + ". Point them at other fluxchat repos to serve those. A private model repo also needs an `HF_TOKEN` "
        "secret with read access.\n"
    )


def push_space(
    space_id: str, variables: dict[str, str], run_name: str, token: str | None = None, private: bool = False
) -> str:
    """Create or update a Gradio Space running this checkout's app.py; `variables` (see `space_variables`)
    name the models it serves. Returns the Space's URL."""
    check_repo_id(space_id, "--space")
    app = REPO_ROOT / "app.py"
    if not app.is_file():
        fail(f"{app} does not exist: the Space runs app.py, so this checkout needs it")
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="fluxchat-space-") as staging:
        staging = Path(staging)
        shutil.copy2(app, staging / "app.py")
        shutil.copy2(REPO_ROOT / "requirements.txt", staging / "requirements.txt")
        # app.py imports the fluxchat library; on a Space the repo root is on sys.path, so the folder suffices.
        (staging / "fluxchat").mkdir()
        for module in (REPO_ROOT / "fluxchat").glob("*.py"):
            shutil.copy2(module, staging / "fluxchat" / module.name)
        (staging / runs.CARD_FILE).write_text(space_readme(variables, run_name), encoding="utf-8")
        refuse_leaked_token(staging, token)
        with hub_errors(f"creating the Space {space_id}", token):
            url = api.create_repo(
                space_id, repo_type="space", space_sdk="gradio", token=token, private=private, exist_ok=True
            )
            api.upload_folder(
                folder_path=staging,
                repo_id=space_id,
                repo_type="space",
                token=token,
                commit_message=f"fluxchat app for {run_name}",
            )
            present = {}
            for key, value in variables.items():
                present = api.add_space_variable(
                    space_id, key, value, description="fluxchat model repo app.py serves", token=token
                )
            # A variable an earlier push set and this one does not (a compare model no longer pushed) would serve
            # the old repo beside the new one.
            for key in SPACE_VARIABLES:
                if key in present and key not in variables:
                    api.delete_space_variable(space_id, key, token=token)
    return str(url)
