"""The `lmstack` command: one subcommand per job, each a recipe's ``run`` with its config's fields as flags.

Flags come from the job's config dataclass (``lmstack/recipes/configs/<job>.py``, no torch), so help and
argument or config errors answer at once; the recipe (``lmstack/recipes/<job>.py``) is imported only to run
the one job asked for (`lmstack chat ...` never imports the training stack).
"""

import argparse
import dataclasses
import importlib
import sys

from lmstack import __version__
from lmstack.config import add_arguments, from_namespace, resolve
from lmstack.errors import LmstackError

# job name -> (module in recipes/ and recipes/configs/, run function, config dataclass), or a dict of sub-jobs
JOBS = {
    "quickstart": ("quickstart", "run", "QuickstartConfig"),
    "info": ("info", "run", "InfoConfig"),
    "convert": ("convert", "run", "ConvertConfig"),
    "quantize": ("quantize", "run", "QuantizeConfig"),
    "prune": ("prune", "run", "PruneConfig"),
    "distill": ("distill", "run", "DistillConfig"),
    "generate": ("generate", "run", "GenerateJobConfig"),
    "chat": ("chat", "run", "ChatConfig"),
    "pretrain": ("pretrain", "run", "PretrainConfig"),
    "finetune": ("finetune", "run", "FinetuneConfig"),
    "sft": ("align", "sft", "SFTConfig"),
    "dpo": ("align", "dpo", "DPOConfig"),
    "reward": ("align", "reward", "RewardConfig"),
    "grpo": ("rl", "grpo", "GRPOConfig"),
    "ppo": ("rl", "ppo", "PPOConfig"),
    "embed": ("embed", "run", "EmbedConfig"),
    "serve": ("serve", "run", "ServeConfig"),
    "agent": ("agent", "run", "AgentConfig"),
    "rag": {
        "index": ("rag", "index", "RagIndexConfig"),
        "query": ("rag", "query", "RagQueryConfig"),
        "ask": ("rag", "ask", "RagAskConfig"),
        "delete": ("rag", "delete", "RagDeleteConfig"),
    },
    "tokenizer": {
        "train": ("tokenizer", "train", "TrainTokenizerConfig"),
        "encode": ("tokenizer", "encode", "EncodeConfig"),
        "decode": ("tokenizer", "decode", "DecodeConfig"),
    },
}


def _config_class(spec: tuple[str, str, str]) -> type:
    return getattr(importlib.import_module(f"lmstack.recipes.configs.{spec[0]}"), spec[2])


def _run_function(spec: tuple[str, str, str]):
    return getattr(importlib.import_module(f"lmstack.recipes.{spec[0]}"), spec[1])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that job's subcommand, so only its recipe is imported."""
    parser = argparse.ArgumentParser(prog="lmstack", description="The whole LLM stack in one readable library.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"lmstack {__version__}")
    jobs = {only: JOBS[only]} if only in JOBS else JOBS
    _add_jobs(parser.add_subparsers(dest="job", metavar="JOB"), jobs, prefix="")
    return parser


def _add_jobs(sub, jobs: dict, prefix: str) -> None:
    for name, job in jobs.items():
        if isinstance(job, dict):  # a group such as `lmstack tokenizer train|encode|decode`
            group = sub.add_parser(name, help=f"{name} commands: {', '.join(job)}", allow_abbrev=False)
            group.set_defaults(job_group=group)
            _add_jobs(group.add_subparsers(dest="job", metavar="COMMAND"), job, prefix=f"{prefix}{name} ")
            continue
        config_cls = _config_class(job)
        doc = " ".join((config_cls.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph
        parser = sub.add_parser(name, help=doc, description=doc, allow_abbrev=False)
        add_arguments(parser, config_cls, overrides_only=_configured_by_yaml(config_cls))
        parser.set_defaults(job_spec=job, config_cls=config_cls, job_name=prefix + name)


def _configured_by_yaml(config_cls: type) -> bool:
    """Jobs whose config has a ``config`` field read a YAML file, then apply the flags given as overrides."""
    return any(f.name == "config" for f in dataclasses.fields(config_cls))


def _job_config(args: argparse.Namespace):
    if not _configured_by_yaml(args.config_cls):
        return from_namespace(args.config_cls, args)
    overrides = {k: v for k, v in vars(args).items() if k not in _BOOKKEEPING}
    return resolve(args.config_cls, overrides.get("config"), overrides)


_BOOKKEEPING = {"job_spec", "config_cls", "job_name", "job", "job_group"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in JOBS else None)
    args = parser.parse_args(argv)
    if getattr(args, "job_spec", None) is None:
        (getattr(args, "job_group", None) or parser).print_help()
        return 0
    try:
        config = _job_config(args)  # a bad value or YAML key fails here, before torch is imported
        _run_function(args.job_spec)(config)
    except LmstackError as error:
        return _fail(args.job_name, str(error))
    except OSError as error:  # a path that cannot be read or written: name it, no traceback
        where = f"{error.filename}: " if error.filename else ""
        return _fail(args.job_name, f"{where}{error.strerror or error}")
    except UnicodeError as error:
        return _fail(args.job_name, f"text is not valid UTF-8 ({error})")
    return 0


def _fail(job: str, message: str) -> int:
    print(f"lmstack {job}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
