"""Serving metrics in Prometheus' text exposition format (``GET /metrics``), with no client library."""

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [f"# TYPE {name} histogram"], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            label = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{label}"}} {running}')
        return out + [f"{name}_sum {self.total}", f"{name}_count {self.count}"]


@dataclass
class Metrics:
    """What the engine thread counts; ``render`` reads it (plain ints and floats: no lock needed)."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    cancelled: int = 0
    steps: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    time_to_first_token: Histogram = field(default_factory=Histogram)
    inter_token_latency: Histogram = field(default_factory=Histogram)
    request_latency: Histogram = field(default_factory=Histogram)
    step_time: Histogram = field(default_factory=Histogram)
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (time, generated tokens so far)
    gauges: dict[str, float] = field(default_factory=dict)

    def record_step(self, seconds: float, engine) -> None:
        self.steps += 1
        self.step_time.observe(seconds)
        self.recent.append((time.perf_counter(), self.generated_tokens))
        self.gauges = {"lmstack_requests_running": len(engine.running),
                       "lmstack_requests_waiting": len(engine.waiting),
                       "lmstack_kv_blocks_used": engine.allocator.num_used,
                       "lmstack_kv_blocks_total": engine.allocator.num_blocks,
                       "lmstack_prefix_cache_hit_blocks": engine.allocator.hits,
                       "lmstack_prefix_cache_query_blocks": engine.allocator.queries,
                       "lmstack_preemptions": engine.preemptions}

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds of steps."""
        now = time.perf_counter()
        points = [(t, n) for t, n in self.recent if now - t <= window]
        if len(points) < 2 or points[-1][0] == points[0][0]:
            return 0.0
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

    def render(self) -> str:
        lines = []
        for name, value in self.gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        lines += ["# TYPE lmstack_generation_tokens_per_second gauge",
                  f"lmstack_generation_tokens_per_second {self.tokens_per_second():.3f}"]
        for name, value in (("lmstack_generated_tokens_total", self.generated_tokens),
                            ("lmstack_prompt_tokens_total", self.prompt_tokens),
                            ("lmstack_requests_cancelled_total", self.cancelled),
                            ("lmstack_engine_steps_total", self.steps)):
            lines += [f"# TYPE {name} counter", f"{name} {value}"]
        lines.append("# TYPE lmstack_requests_finished_total counter")
        lines += [f'lmstack_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        for name, histogram in (("lmstack_time_to_first_token_seconds", self.time_to_first_token),
                                ("lmstack_inter_token_latency_seconds", self.inter_token_latency),
                                ("lmstack_request_latency_seconds", self.request_latency),
                                ("lmstack_engine_step_seconds", self.step_time)):
            lines += histogram.lines(name)
        return "\n".join(lines) + "\n"
