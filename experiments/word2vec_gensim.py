"""A point of scale for docs/experiments.md's word2vec table: gensim's own CBOW on the same
sentences, vocabulary and analogy questions as experiments/word2vec_tp4.py, scored by the same
3CosAdd (``analogy_correct``).  Not the same network as TP4's word2vec.c (gensim has no weight
decay, and its own update order and learning-rate floor), so it is a scale, not a baseline.

    python experiments/word2vec_gensim.py --epochs E --seed S --json OUT

Results: experiments/results/word2vec/gensim/ (outside the directory word2vec_tp4.py --docs reads).

Settings: vector size 64, window 8, 25 negatives, subsampling 1e-4, alpha 0.05 decayed to
5e-6 (gensim's min_alpha), min_count 5, one worker.  gensim 4 draws the initial vectors from
``seed`` alone, so with one worker a run is reproducible (tests/test_experiments_smoke.py runs
it under two PYTHONHASHSEEDs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from word2vec_tp4 import MIN_COUNT, NEGATIVE, SAMPLE, WINDOW, Corpus, analogy_correct, cut_sentences, read_articles  # noqa: E402

VECTOR_SIZE = 64
ALPHA = 0.05
MIN_ALPHA = 5e-6


def run(epochs: int, seed: int) -> dict:
    from gensim.models import Word2Vec

    start = time.perf_counter()
    corpus = Corpus.load()
    sentences = cut_sentences(read_articles())
    model = Word2Vec(vector_size=VECTOR_SIZE, window=WINDOW, negative=NEGATIVE, sample=SAMPLE, alpha=ALPHA,
                     min_alpha=MIN_ALPHA, min_count=MIN_COUNT, sg=0, cbow_mean=1, workers=1, seed=seed)
    model.build_vocab(sentences)
    missing = [w for w in corpus.vocab.words if w not in model.wv.key_to_index]
    if missing or len(model.wv) != corpus.vocab.size:
        raise RuntimeError(f"gensim's vocabulary differs from word2vec_tp4's ({len(model.wv)} words against "
                           f"{corpus.vocab.size}, {len(missing)} missing)")
    t0 = time.perf_counter()
    model.train(sentences, total_examples=model.corpus_count, epochs=epochs)
    t1 = time.perf_counter()
    rows = model.wv.vectors[[model.wv.key_to_index[w] for w in corpus.vocab.words]]
    correct = analogy_correct(lambda idx: rows[idx], corpus.vocab.size, corpus.qids)
    total = len(corpus.qids)
    import gensim

    return {"model": f"gensim {gensim.__version__} CBOW", "epochs": epochs, "seed": seed, "vocab": corpus.vocab.size,
            "correct": correct, "total": total, "accuracy": 100.0 * correct / total,
            "vectors_checksum": float(np.sum(rows, dtype=np.float64)),
            "train_seconds": t1 - t0, "seconds": time.perf_counter() - start,
            "settings": {"vector_size": VECTOR_SIZE, "window": WINDOW, "negative": NEGATIVE, "sample": SAMPLE,
                         "alpha": ALPHA, "min_alpha": MIN_ALPHA, "min_count": MIN_COUNT, "workers": 1}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--quiet", action="store_true", help="print nothing")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error(f"--epochs must be >= 1, got {args.epochs}")
    result = run(args.epochs, args.seed)
    if not args.quiet:
        print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
