"""A bounded load test over a live socket: 200 concurrent streaming requests all complete with no error,
the process's memory stays bounded, and afterwards every KV block is free again."""

import asyncio
import json
from pathlib import Path

import httpx

from tests.serve.conftest import LiveServer, make_server


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _stream_one(client: httpx.AsyncClient, i: int) -> tuple[str, str | None]:
    body = {"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 8, "stream": True,
            "temperature": 0.7, "seed": i}
    text, finish = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_two_hundred_concurrent_streams(chat_model_dir):
    live = LiveServer(make_server(chat_model_dir, num_blocks=256, block_size=8, max_batch=32, max_batch_tokens=256,
                                  max_waiting=256))
    try:
        async def run():
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(base_url=live.url, timeout=120, limits=limits) as client:
                return await asyncio.gather(*(_stream_one(client, i) for i in range(200)), return_exceptions=True)

        before = _rss_mib()
        results = asyncio.run(run())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert all(finish in ("stop", "length") for _, finish in results)
        assert _rss_mib() - before < 200  # bounded: the pool is preallocated; requests leave nothing behind
        metrics = httpx.get(live.url + "/metrics").text
        assert "lmstack_kv_blocks_used 0" in metrics and "lmstack_requests_running 0" in metrics
        finished = sum(int(float(line.split()[-1])) for line in metrics.splitlines()
                       if line.startswith("lmstack_requests_finished_total{"))
        assert finished == 200
    finally:
        live.stop()
