"""Run under ``torchrun`` by ``test_recipes.py``: the ``lmstack`` command lines of a JSON file, one after the other
in one launch (the process group joined once, as ``python -m lmstack`` would for each), recording each one's exit
code and error output per rank in OUT/<name>-rank<R>.json.

    torchrun --nproc-per-node N tests/parallel/recipe_worker.py CASES.json OUT

CASES.json: [{"name": ..., "argv": ["pretrain", "--config", ...], "copy_from": [RUN, STEP, TO]}, ...]; with
copy_from, rank 0 first copies run directory RUN to TO without its checkpoints after STEP (a run stopped there).
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker import copy_until  # noqa: E402

from lmstack.cli import main as lmstack  # noqa: E402
from lmstack.parallel.launch import init_distributed, shutdown  # noqa: E402


def main() -> None:
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    world = init_distributed("gloo", timeout_s=60)
    for case in cases:
        if "copy_from" in case:
            run, step, to = case["copy_from"]
            if world.is_main:
                copy_until(Path(run), Path(to), int(step))
            dist.barrier()
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            code = lmstack(case["argv"])
        (out / f"{case['name']}-rank{world.rank}.json").write_text(json.dumps({"code": code,
                                                                              "stderr": errors.getvalue()}))
    shutdown()


if __name__ == "__main__":
    main()
