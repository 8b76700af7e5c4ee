"""Run under ``torchrun`` by the tests in this folder: each case trains the same tiny Llama for 20 steps through
the real Trainer with one parallel layout, writing its run directory (metrics.jsonl from rank 0, sharded
checkpoints) under OUT/<case>. The tests compare them with a one-process run of ``common.train``.

    torchrun --nproc-per-node N tests/parallel/worker.py OUT TIMEOUT_S CASE [CASE ...]

A case is ``name:key=value,key=value`` over ParallelConfig fields, plus ``tied=1`` (tie the embeddings),
``resume=1`` (continue OUT/<name>'s latest checkpoint), ``kill_at=B@R`` (rank R SIGKILLs itself when asked for batch B)
and
``steps=N``, ``resume_from=RUN@S`` (copy OUT/RUN without its checkpoints after step S, then resume it).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import train  # noqa: E402

from lmstack.errors import LmstackError  # noqa: E402
from lmstack.parallel.config import ParallelConfig  # noqa: E402
from lmstack.parallel.launch import init_distributed, shutdown  # noqa: E402


def parse(case: str) -> tuple[str, dict, dict]:
    name, _, spec = case.partition(":")
    parallel, extra = {}, {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        if key in ("tied", "resume", "steps", "kill_at", "resume_from"):
            extra[key] = value
        else:
            parallel[key] = value if key in ("strategy", "pp_schedule") else int(value)
    return name, parallel, extra


def copy_until(source: Path, target: Path, step: int) -> None:
    """``source`` as it was at checkpoint ``step``: later checkpoints removed (resuming truncates the log)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    for checkpoint in (target / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)


def main() -> None:
    out = Path(sys.argv[1])
    world = init_distributed("gloo", timeout_s=float(sys.argv[2]))
    for case in sys.argv[3:]:
        name, parallel, extra = parse(case)
        if "resume_from" in extra:
            run, step = extra["resume_from"].split("@")
            if world.is_main:
                copy_until(out / run, out / name, int(step))
            dist.barrier()
            extra["resume"] = "1"
        kill_at = None
        if "kill_at" in extra:  # batch B@rank R
            batch, rank = map(int, extra["kill_at"].split("@"))
            kill_at = batch if world.rank == rank else None
        torch._dynamo.utils.counters.clear()
        train(out / name, tied=bool(int(extra.get("tied", 0))), steps=int(extra.get("steps", 20)),
              parallel=ParallelConfig(**parallel), world=world, resume=bool(int(extra.get("resume", 0))),
              kill_at=kill_at)
        if parallel.get("compile") and world.is_main:  # what torch.compile did: graphs made, breaks, fallbacks
            counters = {kind: dict(values) for kind, values in torch._dynamo.utils.counters.items()}
            (out / name / "dynamo.json").write_text(json.dumps(counters, default=str))
    shutdown()


if __name__ == "__main__":
    try:
        main()
    except LmstackError as error:  # what `lmstack` prints: the message, no traceback
        sys.exit(f"error: {error}")
