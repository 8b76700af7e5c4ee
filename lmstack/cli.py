"""The `lmstack` command: one subcommand per job, each a recipe's ``run`` with its config's fields as flags."""

import argparse
import dataclasses
import sys

from lmstack import __version__
from lmstack.config import add_arguments, from_namespace, resolve
from lmstack.errors import LmstackError
from lmstack.recipes import chat, convert, embed, finetune, generate, info, pretrain, quickstart, tokenizer

# job name -> (run function, config dataclass), or a dict of sub-jobs
JOBS = {
    "quickstart": (quickstart.run, quickstart.QuickstartConfig),
    "info": (info.run, info.InfoConfig),
    "convert": (convert.run, convert.ConvertConfig),
    "generate": (generate.run, generate.GenerateJobConfig),
    "chat": (chat.run, chat.ChatConfig),
    "pretrain": (pretrain.run, pretrain.PretrainConfig),
    "finetune": (finetune.run, finetune.FinetuneConfig),
    "embed": (embed.run, embed.EmbedConfig),
    "tokenizer": {
        "train": (tokenizer.train, tokenizer.TrainTokenizerConfig),
        "encode": (tokenizer.encode, tokenizer.EncodeConfig),
        "decode": (tokenizer.decode, tokenizer.DecodeConfig),
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="The whole LLM stack in one readable library.")
    parser.add_argument("--version", action="version", version=f"lmstack {__version__}")
    _add_jobs(parser.add_subparsers(dest="job", metavar="JOB"), JOBS, prefix="")
    return parser


def _add_jobs(sub, jobs: dict, prefix: str) -> None:
    for name, job in jobs.items():
        if isinstance(job, dict):  # a group such as `lmstack tokenizer train|encode|decode`
            group = sub.add_parser(name, help=f"{name} commands: {', '.join(job)}")
            group.set_defaults(job_group=group)
            _add_jobs(group.add_subparsers(dest="job", metavar="COMMAND"), job, prefix=f"{prefix}{name} ")
            continue
        run, config_cls = job
        doc = (config_cls.__doc__ or "").strip().splitlines()[0]
        parser = sub.add_parser(name, help=doc, description=doc)
        add_arguments(parser, config_cls, overrides_only=_configured_by_yaml(config_cls))
        parser.set_defaults(run=run, config_cls=config_cls, job_name=prefix + name)


def _configured_by_yaml(config_cls: type) -> bool:
    """Jobs whose config has a ``config`` field read a YAML file, then apply the flags given as overrides."""
    return any(f.name == "config" for f in dataclasses.fields(config_cls))


def _job_config(args: argparse.Namespace):
    if not _configured_by_yaml(args.config_cls):
        return from_namespace(args.config_cls, args)
    overrides = {k: v for k, v in vars(args).items() if k not in _BOOKKEEPING}
    return resolve(args.config_cls, overrides.get("config"), overrides)


_BOOKKEEPING = {"run", "config_cls", "job_name", "job", "job_group"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        (getattr(args, "job_group", None) or parser).print_help()
        return 0
    try:
        args.run(_job_config(args))
    except LmstackError as error:
        print(f"lmstack {args.job_name}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
