"""The engine's own thread, and the bridge between it and the server's asyncio handlers.

The engine is single-threaded by design: one thread owns it (the main thread under `lmstack serve`, a
background one with ``start()``) and loops ``step()`` while there is work.
Handlers never touch it: ``submit`` and ``cancel`` queue commands the thread applies between steps, and
each step's tokens are handed back to the handler's event loop (``call_soon_threadsafe``) on the
request's own ``asyncio.Queue``. A handler whose client went away cancels: the thread frees the blocks
before the next step.
"""

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from lmstack.errors import LmstackError
from lmstack.serve.metrics import Metrics
from lmstack.serve.sampling import SamplingParams
from lmstack.serve.scheduler import Engine, StepOutput


@dataclass
class Handle:
    """One submitted sequence as its handler sees it: ``(index, output)`` pairs arrive on ``outputs`` (a queue
    the request's sequences may share); an output of ``None`` ends the sequence."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    prompt_tokens: int
    index: int = 0
    seq_id: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    cancelled: bool = False


class EngineRunner:
    """Runs ``engine`` on a background thread.

    Args:
        engine: the continuous-batching engine.
        max_waiting: requests queued (not yet running) at most; ``submit`` refuses beyond (HTTP 429).
        metrics: counters and histograms the thread updates.
    """

    def __init__(self, engine: Engine, max_waiting: int = 256, metrics: Metrics | None = None) -> None:
        self.engine, self.max_waiting = engine, max_waiting
        self.metrics = metrics or Metrics()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.handles: dict[int, Handle] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.running = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="lmstack-engine", daemon=True)

    def start(self) -> "EngineRunner":
        """Run the engine on a background thread (tests, embedding in another program)."""
        self.thread.start()
        return self

    def run_forever(self, until=lambda: False) -> None:
        """Run the engine on the calling thread until ``stop()`` or ``until()`` is true (checked between steps).

        `lmstack serve` runs the engine this way, on the main thread, with the HTTP server on another:
        the compiled kernels' OpenMP threads ran SmolLM2's decoding ~2x slower when their caller was not
        the process's main thread (measured: 12 vs 29 tokens/s at one sequence, 2 threads)."""
        self._loop(until)

    @property
    def alive(self) -> bool:
        return self.running and self.error is None

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    @property
    def queue_full(self) -> bool:
        return len(self.engine.waiting) + self.commands.qsize() >= self.max_waiting

    def submit(self, prompt: list[int], params: SamplingParams, outputs: asyncio.Queue | None = None,
               index: int = 0) -> Handle:
        """Queue one sequence (call from the event loop); ``(index, output)`` pairs arrive on ``outputs``."""
        handle = Handle(asyncio.get_running_loop(), outputs or asyncio.Queue(), len(prompt), index)
        self.commands.put(("add", handle, prompt, params))
        self.wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        self.commands.put(("cancel", handle))
        self.wake.set()

    def finish(self, handle: Handle) -> None:
        """End a sequence early with reason "stop" (a stop string matched in its text)."""
        self.commands.put(("finish", handle))
        self.wake.set()

    # ---- the engine thread ------------------------------------------------------------------------
    def _apply(self, command) -> None:
        kind, handle = command[0], command[1]
        if kind == "add":
            if handle.seq_id is None and not handle.cancelled:
                try:
                    handle.seq_id = self.engine.add(command[2], command[3])
                except LmstackError as error:  # refused (the handler checks first): this request fails, not the engine
                    handle.loop.call_soon_threadsafe(handle.outputs.put_nowait, (handle.index, error))
                    return
                self.handles[handle.seq_id] = handle
            return
        handle.cancelled = True
        if handle.seq_id is not None and handle.seq_id in self.handles:
            if kind == "cancel":
                self.engine.cancel(handle.seq_id)
                self.metrics.cancelled += 1
            else:
                self.engine.finish(handle.seq_id)
                self._deliver(handle.seq_id, None)

    def _loop(self, until=lambda: False) -> None:
        self.running = True
        try:
            while not self.stopping and not until():
                while not self.commands.empty():
                    self._apply(self.commands.get())
                if not self.engine.has_work:
                    self.wake.wait(timeout=0.5)
                    self.wake.clear()
                    continue
                start = time.perf_counter()
                outputs = self.engine.step()
                self.metrics.record_step(time.perf_counter() - start, self.engine)
                for out in outputs:
                    self._emit(out)
        except BaseException as error:  # a bug in the engine: fail every waiting request rather than hang
            self.error = error
            for seq_id in list(self.handles):
                self._deliver(seq_id, error)
            if isinstance(error, KeyboardInterrupt):
                raise
        finally:
            self.running = False

    def _emit(self, out: StepOutput) -> None:
        handle = self.handles.get(out.seq_id)
        if handle is None:
            return
        if out.sample is not None:
            now = time.perf_counter()
            if handle.first_token is None:
                handle.first_token = now
                self.metrics.time_to_first_token.observe(now - handle.submitted)
                self.metrics.prompt_tokens += handle.prompt_tokens
            else:
                self.metrics.inter_token_latency.observe(now - handle.last_token)
            handle.last_token = now
            self.metrics.generated_tokens += 1
            handle.loop.call_soon_threadsafe(handle.outputs.put_nowait, (handle.index, out))
        if out.finish_reason is not None:
            self.metrics.request_latency.observe(time.perf_counter() - handle.submitted)
            self.metrics.finished[out.finish_reason] = self.metrics.finished.get(out.finish_reason, 0) + 1
            if out.sample is None:
                handle.loop.call_soon_threadsafe(handle.outputs.put_nowait, (handle.index, out))
            self._deliver(out.seq_id, None)

    def _deliver(self, seq_id: int, final) -> None:
        handle = self.handles.pop(seq_id, None)
        if handle is not None:
            handle.loop.call_soon_threadsafe(handle.outputs.put_nowait, (handle.index, final))
