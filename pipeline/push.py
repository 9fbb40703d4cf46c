"""Publish a run on the Hugging Face Hub: one model repo per stage, linked through `base_model`, and
optionally a Gradio Space that chats with the final model.

    hf auth login                                            # once; or export HF_TOKEN=hf_...
    python pipeline/push.py runs/demo --hub_user alice                       # alice/demo-tokenizer, alice/demo-pretrain, ...
    python pipeline/push.py runs/demo --hub_user alice --private --space alice/fluxchat-demo
    python pipeline/push.py demo --hub_user alice --stages sft ppo            # a run name works too
    python pipeline/sft.py --preset tiny --run_name demo --push_to_hub --hub_model_id alice/demo-sft   # one stage

Every finished stage becomes <hub_user>/<run_name>-<stage>; its model card is rewritten first with
the Hub names (base_model = the previous stage's repo: sft <- pretrain, reward, ppo, grpo and dpo <- sft).
Checkpoints, optimizer states, logs and training_args.bin stay local. The Space runs app.py with Space
variables naming its models, among the repos this command pushes or an earlier one did: FLUXCHAT_MODEL =
the ppo repo (else grpo, dpo, sft, pretrain), FLUXCHAT_COMPARE_MODEL = the sft repo it started from (else the
next of those), FLUXCHAT_REWARD_MODEL = the reward repo.

The token comes from the standard login or HF_TOKEN and is never printed or written: errors from the
Hub are reduced to one line with anything token-shaped removed, and a folder that contains the token
is refused before anything is uploaded.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fluxchat import cards, runs
from fluxchat.cli import fail, run_cli
from fluxchat.config import REPO_ROOT, parse_config
from fluxchat.hub import (
    REPO_ID_PATTERN,
    base_repo,
    ensure_can_push,
    existing_repos,
    local_adapter_base,
    push_space,
    push_stage,
    space_variables,
    stage_repos,
)

# What a Space can serve or score with: the chat models and the reward model.
SPACE_STAGES = (*runs.CHAT_STAGES, "reward")


@dataclass
class PushArguments:
    run_dir: str = field(
        metadata={"help": "Run folder (runs/<run_name>) or run name; also accepted as the first positional argument."}
    )
    hub_user: str = field(
        metadata={"help": "Hub user or organisation that owns the repos: <hub_user>/<run_name>-<stage>."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repos (and the Space) private."})
    stages: list[str] | None = field(
        default=None, metadata={"help": "Push only these stages (default: every finished stage)."}
    )
    space: str | None = field(
        default=None,
        metadata={"help": "Also create/update this Gradio Space (<user>/<name>) running app.py on the pushed model."},
    )

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.hub_user):
            raise ValueError(
                f"--hub_user '{self.hub_user}' is not a Hub user or organisation name (letters, digits, - _ .; no /)"
            )
        if self.space is not None and not REPO_ID_PATTERN.fullmatch(self.space):
            raise ValueError(f"--space '{self.space}' must look like <user>/<space_name>")
        for stage in self.stages or []:
            if stage not in runs.STAGES:
                raise ValueError(f"--stages: unknown stage '{stage}'; choose from {', '.join(runs.STAGES)}")


def resolve_run_folder(value: str) -> Path:
    folder = Path(value)
    if not folder.is_dir() and "/" not in value:
        folder = runs.run_dir(value)  # a bare run name
    if not folder.is_dir():
        fail(f"run folder {value} does not exist: give runs/<run_name> (or the run name) of a trained run")
    if runs.is_finished(folder) and folder.name in runs.STAGES:  # runs/<name>/sft for runs/<name>
        fail(
            f"{value} is one stage of a run: give the run folder {folder.parent} (--stages {folder.name} pushes that stage alone)"
        )
    return folder


def adapter_base_repo(run_folder: Path, stage: str, repos: dict[str, str]) -> str | None:
    """For a LoRA adapter stage trained on another stage of this run: that stage's repo, which the pushed adapter
    must name as its base (it named the local folder, so it loaded nowhere else, the Space included)."""
    base = local_adapter_base(run_folder / stage)
    if base is None:
        return None
    for other, repo in repos.items():
        if (run_folder / other).resolve() == base.resolve():
            return repo
    fail(
        f"{run_folder / stage} holds a LoRA adapter whose base model is the local folder {base}, which is no finished "
        "stage of this run and would not be on the Hub: merge the adapter (the default, --merge_adapter) and push that"
    )


def main(argv: list[str] | None = None) -> dict[str, str]:
    args, _ = parse_config("push", (PushArguments,), argv, positional="run_dir")
    run_folder = resolve_run_folder(args.run_dir)
    repos = stage_repos(run_folder, args.hub_user)
    for stage in args.stages or []:
        if stage not in repos:
            fail(
                f"--stages {stage}: {run_folder / stage} is not a finished stage; produce it with `{runs.producer(stage, run_folder.name)}`"
            )
    selected = [s for s in runs.STAGES if s in repos and (not args.stages or s in args.stages)]
    for stage in runs.STAGES:
        if (run_folder / stage).is_dir() and stage not in repos and not args.stages:
            print(f"note: skipping {run_folder / stage}: not finished", file=sys.stderr)
    if not selected:
        fail(
            f"{run_folder} has no finished stage to push: run `{runs.producer('tokenizer', run_folder.name)}` and the stages after it"
        )
    # The Space serves what this command pushes, and what an earlier one did (checked once a push can happen):
    # variables naming every finished stage sent it, after `--stages tokenizer pretrain sft`, to a ppo repo that
    # was never pushed, and it stopped at start.
    pushing = {stage: repos[stage] for stage in selected}
    if args.space and space_variables(repos).get("FLUXCHAT_MODEL") is None:
        fail(f"--space needs a model to serve, but {run_folder} has no finished pretrain, sft, ppo, grpo or dpo stage")
    if args.space and not (REPO_ROOT / "app.py").is_file():
        fail(f"--space: {REPO_ROOT / 'app.py'} does not exist; the Space runs app.py")
    adapter_bases = {stage: adapter_base_repo(run_folder, stage, repos) for stage in selected}  # before any push
    ensure_can_push()
    if args.space:
        earlier = existing_repos({s: r for s, r in repos.items() if s not in pushing and s in SPACE_STAGES})
        variables = space_variables({**earlier, **pushing})
        if "FLUXCHAT_MODEL" not in variables:
            served = ", ".join(s for s in runs.CHAT_STAGES if s in repos)
            fail(f"--space: no model for it to serve is on the Hub or in --stages: add one of {served} to --stages")
    else:
        variables = space_variables(pushing)
    model_repo = variables.get("FLUXCHAT_MODEL")

    pushed: dict[str, str] = {}
    for stage in selected:
        # A stage trained from a model outside the run is not based on the run's parent repo (a Hub id it named is
        # found by the card itself; a local folder elsewhere has no repo to name).
        config = runs.read_config(run_folder / stage)
        base = None if cards.foreign_parent(run_folder / stage, stage, config) else base_repo(stage, repos)
        url = push_stage(
            run_folder / stage,
            repos[stage],
            private=args.private,
            base_model=base,
            lineage_repos=repos,
            adapter_base_repo=adapter_bases[stage],
        )
        pushed[stage] = url
        print(f"pushed {stage:9s} -> {url}" + (f"  (base_model: {base})" if base else ""), flush=True)
    if args.space:
        pushed["space"] = push_space(args.space, variables, run_folder.name, private=args.private)
        print(f"pushed {'space':9s} -> {pushed['space']}  ({', '.join(f'{k}={v}' for k, v in variables.items())})")
        if args.private:  # else its first start fails: "cannot load the tokenizer ... HF_TOKEN for a private model"
            print(
                f"note: the Space and its models are private: add a secret HF_TOKEN (a read token) in the Space's "
                f"settings (https://huggingface.co/spaces/{args.space}/settings) so it can load them",
                file=sys.stderr,
            )
    if model_repo:
        print(f"chat with it: python pipeline/chat.py {model_repo}")
    return pushed


if __name__ == "__main__":
    run_cli(main)
