"""Kill a training run mid-way, as a crash would: the helper the resume tests share."""

import signal
import subprocess
import time
from pathlib import Path


def kill_once_logged(command: list[str], env: dict, metrics: Path, lines: int, timeout: float = 120) -> int:
    """Run ``command`` and SIGKILL it as soon as ``metrics`` (its metrics.jsonl) has ``lines`` lines; returns
    how many lines it had logged when it died. Fails if the run ended on its own first."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert process.wait() == -signal.SIGKILL, "the run should have been killed mid-way"
    return len(metrics.read_text().splitlines())
