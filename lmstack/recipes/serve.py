"""`lmstack serve --model DIR|FILE.gguf`: the OpenAI-compatible server (see lmstack/serve/app.py).

    lmstack serve --model smollm2-135m-instruct --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

The model loads as for `lmstack chat` (quantized with --quantize); the engine runs on its own thread;
uvicorn serves the API, and Ctrl-C stops both.
"""

import sys
import threading

from lmstack.errors import ConfigError
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.serve import ServeConfig
from lmstack.recipes.sampling import open_for_decoding
from lmstack.serve import Engine
from lmstack.serve.app import Server, create_app
from lmstack.serve.runner import EngineRunner


def build_server(cfg: ServeConfig) -> Server:
    """Load the model (and the embedding model) and return the Server; its engine is not running yet."""
    files = open_for_decoding(cfg)
    if files.tokenizer is None:
        raise ConfigError(f"{cfg.model} has no tokenizer (tokenizer.json, or vocab.json + merges.txt) to serve text")
    files.model.eval()
    engine = Engine(files.model, num_blocks=cfg.kv_blocks, block_size=cfg.block_size, max_batch=cfg.max_batch,
                    max_batch_tokens=cfg.max_batch_tokens, eos_token_ids=files.stop_ids,
                    prefix_caching=cfg.prefix_caching)
    embed = _embedder(cfg.embedding_model) if cfg.embedding_model is not None else None
    embedding_name = _name(cfg.embedding_model) if cfg.embedding_model is not None else None
    runner = EngineRunner(engine, max_waiting=cfg.max_waiting)
    return Server(files, runner, cfg.model_name or _name(cfg.model), embed, embedding_name)


def _embedder(path):
    """texts -> (unit vectors (n, d), tokens read) with the encoder checkpoint at ``path``."""
    from lmstack.rag import SentenceEncoder

    encoder = SentenceEncoder(resolve_model_dir(path))

    def embed(texts: list[str]):
        return encoder.encode(texts), sum(len(encoder.tokenizer.encode(t)) for t in texts)

    return embed


def _name(path) -> str:
    return path.stem if path.suffix == ".gguf" else path.name


def run(cfg: ServeConfig) -> None:
    import uvicorn

    server = build_server(cfg)
    web = uvicorn.Server(uvicorn.Config(create_app(server), host=cfg.host, port=cfg.port, log_level=cfg.log_level))
    # The HTTP server on a thread, the engine on this (main) thread: see EngineRunner.run_forever.
    thread = threading.Thread(target=web.run, name="lmstack-http", daemon=True)
    thread.start()
    print(f"serving {server.model_name} on http://{cfg.host}:{cfg.port} (web chat at /, API at /v1)",
          file=sys.stderr, flush=True)
    try:
        server.runner.run_forever(until=lambda: not thread.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        web.should_exit = True
        thread.join(timeout=10)
    if not web.started:
        raise ConfigError(f"the HTTP server could not start on {cfg.host}:{cfg.port} (see the message above)")
