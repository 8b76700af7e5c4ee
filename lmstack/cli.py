"""The `lmstack` command: one subcommand per job, each a recipe's ``run`` with its config's fields as flags."""

import argparse
import sys

from lmstack import __version__
from lmstack.config import add_arguments, from_namespace
from lmstack.errors import LmstackError
from lmstack.recipes import convert, generate, info, quickstart

# job name -> (run function, config dataclass)
JOBS = {
    "quickstart": (quickstart.run, quickstart.QuickstartConfig),
    "info": (info.run, info.InfoConfig),
    "convert": (convert.run, convert.ConvertConfig),
    "generate": (generate.run, generate.GenerateJobConfig),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="The whole LLM stack in one readable library.")
    parser.add_argument("--version", action="version", version=f"lmstack {__version__}")
    sub = parser.add_subparsers(dest="job", metavar="JOB")
    for name, (_, config_cls) in JOBS.items():
        doc = (config_cls.__doc__ or "").strip().splitlines()[0]
        add_arguments(sub.add_parser(name, help=doc, description=doc), config_cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.job is None:
        parser.print_help()
        return 0
    run, config_cls = JOBS[args.job]
    try:
        run(from_namespace(config_cls, args))
    except LmstackError as error:
        print(f"lmstack {args.job}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
