"""TP4's word2vec experiment (Yang & Hu, "Feature Learning in Infinite-Width Neural Networks",
code edwardjhu/TP4 Word2Vec/src/word2vec.c), on gensim's bundled Wikipedia excerpt:

    python experiments/word2vec_tp4.py --width inf|gp|N --epochs E --seed S --json OUT

``--width N`` trains the width-N network (method "finite"), ``inf`` its exact muP limit (method
"exact": coefficients over a Gaussian basis of V vectors), ``gp`` the NTK/GP baseline (the limit
with the input embeddings frozen at init).  The network is the DSL program
programs/word2vec_cbow.py trained through the public step engine (tp.StepEngine); nothing here
knows the limit.  The JSON holds width, epochs, seed, vocab, correct, total, accuracy (percent)
and seconds (training plus evaluation).

Protocol (TP4's word2vec.c CBOW with negative sampling; the corpus and the sentence cut are this
repository's choice, the rest is word2vec.c):

* corpus: ``WikiCorpus(path, dictionary={}, lower=True, token_min_len=1, token_max_len=30)``
  articles; each article's token list is cut into consecutive sentences of 1000 tokens
  (the last one shorter);
* vocabulary: words with count >= 5 (V = 9044), ordered by decreasing count (ties: the word);
  out-of-vocabulary tokens are dropped from the sentences; T = number of in-vocabulary tokens;
* subsampling (word2vec.c's formula, threshold s = 1e-4): a token of word w with count c_w is
  kept with probability min(1, (sqrt(c_w / (s T)) + 1) s T / c_w), drawn afresh every epoch;
* CBOW windows: for each kept position, b ~ U{0..7} and the context is the kept words at
  distance 1..8-b on either side within the sentence; positions with an empty context are
  skipped (no update), as word2vec.c does; the network's input is the context mean
  xi = (count of w in the context) / |C| at each context word w;
* negatives: 25 draws from the unigram distribution c_w^0.75 / sum c^0.75; a draw equal to the
  target is skipped (word2vec.c), repeated draws are kept; labels 1 for the target, 0 for the
  negatives, logistic loss on those outputs only;
* learning rate: alpha_t = 0.05 max(1 - w_t / (E T + 1), 1e-4) with w_t the in-vocabulary tokens
  read before position t (subsampled ones included) over all epochs so far;
* weight decay 0.001 as word2vec.c applies it: each step multiplies the touched rows (the context
  words' input rows, the target's and negatives' output rows) by (1 - alpha_t 0.001) before
  adding the update (``StepEngine(weight_decay=0.001, decay_rows="touched")``).

Where this differs from TP4's word2vec.c (edwardjhu/TP4 Word2Vec/src/word2vec.c): a single
thread (TP4: 68 Hogwild threads); the exact sigmoid (word2vec.c: a table, clipped at |f| = 12);
one gradient step per position, so a negative drawn twice has both copies evaluated at the old
weights (word2vec.c updates the first copy before reading the second) and a word repeated in the
context decays once (word2vec.c: once per occurrence); the learning rate recomputed at every
position (word2vec.c: every ~10^4 words); sentences cut before out-of-vocabulary removal and
subsampling (word2vec.c cuts 1000 kept words); Gaussian initial rows at finite width (TP4:
uniform with the same variance; the limit is the same); the limit on a basis of V Gaussians
(TP4: 2V coordinates, of which the second V stay zero).

Evaluation: 3CosAdd on unit-normalised input embeddings (questions-words.txt of gensim's test
data, words lowercased; a question with a word outside the vocabulary is skipped): the answer to
a : b :: c : ? is argmax_w cos(w, b - a + c) over the vocabulary without a, b, c, with
b - a + c a sum of unit vectors (word2vec's compute-accuracy).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: use the tpcompiler of this checkout
    sys.path.insert(0, str(ROOT))

#: TP4's hyperparameters (Word2Vec/scripts/train-text8*.sh of edwardjhu/TP4, and the issue).
SENTENCE = 1000
MIN_COUNT = 5
WINDOW = 8
NEGATIVE = 25
SAMPLE = 1e-4
ALPHA = 0.05
ALPHA_FLOOR = 1e-4
WEIGHT_DECAY = 0.001
EPOCHS = 15
UNIGRAM_POWER = 0.75


def test_data_dir() -> Path:
    """gensim's bundled test data (the corpus and the analogy questions)."""
    import gensim

    return Path(gensim.__file__).resolve().parent / "test" / "test_data"


def corpus_path() -> Path:
    return test_data_dir() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def questions_path() -> Path:
    return test_data_dir() / "questions-words.txt"


# -- corpus and vocabulary ------------------------------------------------------------------

def read_articles(path=None) -> list[list[str]]:
    """The articles' token lists, as gensim's WikiCorpus reads them with TP4's settings."""
    from gensim.corpora.wikicorpus import WikiCorpus

    wiki = WikiCorpus(str(path or corpus_path()), dictionary={}, lower=True, token_min_len=1,
                      token_max_len=30, processes=1)
    return [list(tokens) for tokens in wiki.get_texts()]


def cut_sentences(articles, length: int = SENTENCE) -> list[list[str]]:
    """Each article cut into consecutive pieces of ``length`` tokens (the last one shorter)."""
    if length < 1:
        raise ValueError(f"sentence length must be positive, got {length}")
    return [a[i:i + length] for a in articles for i in range(0, len(a), length)]


@dataclass(frozen=True)
class Vocab:
    """Words with count >= min_count, by decreasing count (ties by the word)."""

    words: tuple
    counts: np.ndarray  # int64, aligned with words
    index: dict

    @property
    def size(self) -> int:
        return len(self.words)

    @property
    def total(self) -> int:
        """T: the number of in-vocabulary tokens of the corpus."""
        return int(self.counts.sum())


def build_vocab(sentences, min_count: int = MIN_COUNT) -> Vocab:
    counts: dict[str, int] = {}
    for s in sentences:
        for w in s:
            counts[w] = counts.get(w, 0) + 1
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return Vocab(tuple(kept), np.array([counts[w] for w in kept], dtype=np.int64), {w: i for i, w in enumerate(kept)})


def encode(sentences, vocab: Vocab) -> list[np.ndarray]:
    """Sentences as arrays of word indices, out-of-vocabulary tokens dropped (empty ones kept out)."""
    out = []
    for s in sentences:
        ids = np.array([vocab.index[w] for w in s if w in vocab.index], dtype=np.int64)
        if ids.size:
            out.append(ids)
    return out


# -- word2vec.c's sampling ------------------------------------------------------------------

def keep_probability(counts, sample: float = SAMPLE) -> np.ndarray:
    """word2vec.c's subsampling: P(keep a token of w) = min(1, (sqrt(c_w/(s T)) + 1) s T / c_w),
    T = sum of the counts, s the threshold (s = 0: keep everything)."""
    counts = np.asarray(counts, dtype=np.float64)
    if sample <= 0:
        return np.ones_like(counts)
    st = sample * counts.sum()
    return np.minimum(1.0, (np.sqrt(counts / st) + 1.0) * st / counts)


def unigram_cdf(counts, power: float = UNIGRAM_POWER) -> np.ndarray:
    """Cumulative distribution of the negative-sampling distribution c_w^power / sum c^power."""
    p = np.asarray(counts, dtype=np.float64) ** power
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return cdf


def learning_rate(words_read, total_words: int, alpha: float = ALPHA, floor: float = ALPHA_FLOOR):
    """word2vec.c's schedule: alpha max(1 - words_read / (total_words + 1), floor), total_words =
    epochs x T, words_read counting in-vocabulary tokens read so far (subsampled ones included)."""
    if np.ndim(words_read) == 0:  # the training loop's case, without numpy's per-call overhead
        return alpha * max(1.0 - float(words_read) / (total_words + 1), floor)
    return alpha * np.maximum(1.0 - np.asarray(words_read, dtype=np.float64) / (total_words + 1), floor)


@dataclass
class Step:
    """One CBOW update: the target word, its context words (with repetitions, in window order),
    the negatives (target excluded, repetitions kept) and the words read before it."""

    target: int
    context: np.ndarray
    negatives: np.ndarray
    words_read: int

    def outputs(self) -> np.ndarray:
        """The output coordinates the loss touches: the target first, then the negatives."""
        return np.concatenate(([self.target], self.negatives)).astype(np.int64)

    def labels(self) -> np.ndarray:
        y = np.zeros(1 + self.negatives.size)
        y[0] = 1.0
        return y

    def context_mean(self, V: int) -> tuple[np.ndarray, np.ndarray]:
        """The input xi as (columns, values): xi_w = (count of w in the context) / |C|."""
        counts = Counter(self.context.tolist())  # ~10 words: faster than np.unique
        cols = sorted(counts)
        return np.array(cols, dtype=np.int64), np.array([counts[c] for c in cols], dtype=np.float64) / self.context.size


def sentence_steps(ids: np.ndarray, keep: np.ndarray, cdf: np.ndarray, rng: np.random.Generator,
                   words_before: int, window: int = WINDOW, negative: int = NEGATIVE):
    """The CBOW steps of one encoded sentence (word2vec.c): subsample, then per kept position a
    shrink b ~ U{0..window-1}, the context at distance 1..window-b among the kept words, and
    ``negative`` draws from the unigram^0.75 table.  Randomness, in order: one uniform per token
    (subsampling), one shrink per kept token, ``negative`` uniforms per kept token."""
    n = ids.size
    kept_at = np.flatnonzero(rng.random(n) < keep[ids])
    sent = ids[kept_at]
    m = sent.size
    shrink = rng.integers(0, window, size=m)
    draws = np.searchsorted(cdf, rng.random((m, negative)), side="right")
    np.minimum(draws, cdf.size - 1, out=draws)
    for pos in range(m):
        reach = window - int(shrink[pos])
        lo, hi = max(0, pos - reach), min(m, pos + reach + 1)
        context = np.concatenate((sent[lo:pos], sent[pos + 1:hi]))
        if context.size == 0:
            continue
        target = int(sent[pos])
        negs = draws[pos]
        yield Step(target, context, negs[negs != target], words_before + int(kept_at[pos]))


def epoch_steps(encoded, keep, cdf, rng, epoch: int, total: int, window: int = WINDOW, negative: int = NEGATIVE):
    """All steps of one epoch over the encoded sentences in corpus order; ``total`` = T."""
    before = epoch * total
    for ids in encoded:
        yield from sentence_steps(ids, keep, cdf, rng, before, window, negative)
        before += ids.size


# -- evaluation -----------------------------------------------------------------------------

def read_questions(path=None) -> list[tuple[str, str, str, str]]:
    """The analogy questions (a, b, c, d), lowercased; section headers (": ...") dropped."""
    out = []
    for line in Path(path or questions_path()).read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and not line.startswith(":"):
            out.append(tuple(p.lower() for p in parts))
    return out


def question_ids(questions, index: dict) -> np.ndarray:
    """(Q, 4) word indices of the questions with all four words in the vocabulary."""
    rows = [[index[w] for w in q] for q in questions if all(w in index for w in q)]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def _unit(rows: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norm > 0, norm, 1.0)


def analogy_correct(embed, V: int, qids: np.ndarray, chunk: int = 1024) -> int:
    """3CosAdd: how many questions (a, b, c, d) have d = argmax over w not in {a, b, c} of
    cos(w, b^ - a^ + c^), x^ the unit-normalised embedding.  ``embed(idx)`` returns the embedding
    rows of the word indices ``idx`` (any width D); the vocabulary is read ``chunk`` words at a
    time, so the V x D matrix is never held."""
    if qids.size == 0:
        return 0
    qwords, inv = np.unique(qids[:, :3], return_inverse=True)
    inv = inv.reshape(-1, 3)
    qe = _unit(np.asarray(embed(qwords), dtype=np.float64))
    query = qe[inv[:, 1]] - qe[inv[:, 0]] + qe[inv[:, 2]]
    best = np.full(len(qids), -np.inf)
    arg = np.full(len(qids), -1, dtype=np.int64)
    for start in range(0, V, chunk):
        idx = np.arange(start, min(V, start + chunk))
        scores = query @ _unit(np.asarray(embed(idx), dtype=np.float64)).T
        for j in range(3):  # exclude the question words
            q = np.flatnonzero((qids[:, j] >= start) & (qids[:, j] < idx[-1] + 1))
            scores[q, qids[q, j] - start] = -np.inf
        top = scores.argmax(axis=1)
        val = scores[np.arange(len(qids)), top]
        better = val > best
        best[better] = val[better]
        arg[better] = idx[top[better]]
    return int(np.sum(arg == qids[:, 3]))


# -- training through the public step engine ------------------------------------------------

@dataclass
class Corpus:
    """Everything the training loop and the evaluation read, built once from the files."""

    vocab: Vocab
    encoded: list
    keep: np.ndarray
    cdf: np.ndarray
    qids: np.ndarray
    questions: int  # all questions of the file (answered + skipped)

    @classmethod
    def load(cls, min_count: int = MIN_COUNT, sample: float = SAMPLE) -> "Corpus":
        sentences = cut_sentences(read_articles())
        vocab = build_vocab(sentences, min_count)
        qs = read_questions()
        return cls(vocab, encode(sentences, vocab), keep_probability(vocab.counts, sample), unigram_cdf(vocab.counts),
                   question_ids(qs, vocab.index), len(qs))

    def expected_steps(self) -> float:
        """Expected kept tokens per epoch, sum_w c_w keep_w (an upper bound on the steps: a
        kept token with an empty context is no step)."""
        return float(np.sum(self.vocab.counts * self.keep))


def network(V: int, frozen: bool = False):
    """The DSL template programs/word2vec_cbow.py (its docstring: why muP is word2vec.c)."""
    import tpcompiler as tp

    return tp.load(ROOT / "programs" / "word2vec_cbow.py", V=V, frozen=frozen)


def make_engine(width: str, V: int, seed: int, weight_decay: float = WEIGHT_DECAY):
    """``inf``: the exact limit; ``gp``: the exact limit with frozen input embeddings; an integer
    n: the width-n network (one seed)."""
    import tpcompiler as tp

    frozen = width == "gp"
    kwargs = dict(loss="negative_sampling", seed=seed, weight_decay=weight_decay, decay_rows="touched")
    if width in ("inf", "gp"):
        return tp.StepEngine(network(V, frozen), tp.named("mup", 1), method="exact", **kwargs)
    return tp.StepEngine(network(V, frozen), tp.named("mup", 1), method="finite", width=int(width), seeds=1, **kwargs)


def csr_row(cols: np.ndarray, vals: np.ndarray, V: int):
    """The 1 x V CSR row with ``vals`` at the sorted, distinct columns ``cols``, without scipy's
    format checks (``tpcompiler.training.engine.csr_row``)."""
    from tpcompiler.training.engine import csr_row as fast_row

    return fast_row(cols, vals, V)


def one_hot(idx: np.ndarray, V: int):
    import scipy.sparse as sps

    idx = np.asarray(idx, dtype=np.int64)
    return sps.csr_matrix((np.ones(idx.size), idx, np.arange(idx.size + 1)), shape=(idx.size, V))


def embeddings(eng, V: int):
    """``embed(idx)``: the input embeddings of words idx as rows whose inner products are the
    engine's E[Z^h(e_a) Z^h(e_b)] (replicas side by side, scaled by 1/sqrt(R))."""
    def embed(idx, part: int = 64):
        out = []
        for start in range(0, len(idx), part):  # small one-hot batches: the engine's cost grows with B^2
            F = np.asarray(eng.features(one_hot(idx[start:start + part], V)), dtype=np.float64)  # (R, N, D)
            R, N, D = F.shape
            out.append(F.transpose(1, 0, 2).reshape(N, R * D) / math.sqrt(R))
        return np.concatenate(out, axis=0)
    return embed


def train(eng, corpus: Corpus, epochs: int, seed: int, max_steps: int | None = None, progress: bool = True,
          max_seconds: float | None = None) -> tuple[int, bool]:
    """TP4's protocol (module docstring) for ``epochs`` epochs; the learning rate decays over
    ``epochs`` x T words.  Returns (steps taken, whether all epochs were done): ``max_steps``
    or ``max_seconds`` of training stop early."""
    from tpcompiler import progress as bars

    V, T = corpus.vocab.size, corpus.vocab.total
    rng = np.random.default_rng(seed)
    total = epochs * T
    # on a terminal only (tpcompiler.progress), never when asked not to
    bar = bars.bar(max_steps or int(round(epochs * corpus.expected_steps())), "word2vec", unit="step",
                   enabled=None if progress else False, mininterval=30.0, smoothing=0.05)
    steps = 0
    started = time.perf_counter()
    chunk = Chunk(V)
    complete = True
    try:
        for epoch in range(epochs):
            for st in epoch_steps(corpus.encoded, corpus.keep, corpus.cdf, rng, epoch, T):
                if max_steps is not None and steps + len(chunk) >= max_steps:
                    complete = False
                    break
                if max_seconds is not None and len(chunk) == 0 and time.perf_counter() - started > max_seconds:
                    complete = False
                    break
                cols, vals = st.context_mean(V)
                chunk.add(cols, vals, st.outputs(), st.labels(), learning_rate(st.words_read, total))
                if len(chunk) == CHUNK:
                    steps += chunk.run(eng)
                    bar.update(CHUNK)
            if not complete:
                break
        n = chunk.run(eng)
        steps += n
        bar.update(n)
    finally:
        bar.close()
    return steps, complete


#: Steps handed to the engine at once (``StepEngine.steps``): the exact limit runs them in one
#: compiled loop; finite widths step through them one by one.
CHUNK = 4096


class Chunk:
    """Steps collected for one ``StepEngine.steps`` call: the context means as CSR rows, the
    sampled outputs, their labels and the learning rates."""

    def __init__(self, V: int):
        self.V = V
        self.clear()

    def clear(self) -> None:
        self.indptr, self.indices, self.data = [0], [], []
        self.outputs, self.labels, self.lrs = [], [], []

    def __len__(self) -> int:
        return len(self.lrs)

    def add(self, cols, vals, outputs, labels, lr) -> None:
        self.indices.append(cols), self.data.append(vals)
        self.indptr.append(self.indptr[-1] + cols.size)
        self.outputs.append(outputs), self.labels.append(labels), self.lrs.append(lr)

    def run(self, eng) -> int:
        """Hand the collected steps to the engine; returns how many."""
        import scipy.sparse as sps

        n = len(self)
        if n:
            X = sps.csr_matrix((np.concatenate(self.data), np.concatenate(self.indices), np.array(self.indptr)),
                               shape=(n, self.V))
            eng.steps(X, self.labels, np.array(self.lrs), self.outputs)
        self.clear()
        return n


def evaluate(eng, corpus: Corpus) -> int:
    return analogy_correct(embeddings(eng, corpus.vocab.size), corpus.vocab.size, corpus.qids, chunk=512)


def run(width: str, epochs: int, seed: int, max_steps: int | None = None, progress: bool = True,
        max_seconds: float | None = None) -> dict:
    start = time.perf_counter()
    corpus = Corpus.load()
    V = corpus.vocab.size
    eng = make_engine(width, V, seed)
    t0 = time.perf_counter()
    steps, complete = train(eng, corpus, epochs, seed, max_steps, progress, max_seconds)
    t1 = time.perf_counter()
    correct = evaluate(eng, corpus)
    t2 = time.perf_counter()
    total = len(corpus.qids)
    return {"width": width, "epochs": epochs, "seed": seed, "vocab": V, "correct": correct, "total": total,
            "accuracy": 100.0 * correct / total if total else float("nan"), "seconds": t2 - start,
            "setup_seconds": t0 - start, "train_seconds": t1 - t0, "eval_seconds": t2 - t1, "steps": steps,
            "steps_per_second": steps / (t1 - t0) if t1 > t0 else float("nan"),
            "complete": complete, "questions_in_file": corpus.questions}


# -- command line ---------------------------------------------------------------------------

class UsageError(Exception):
    """A bad command line, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(message)


def _width(text: str) -> str:
    t = text.strip().lower()
    if t in ("inf", "gp"):
        return t
    if t.isdigit() and int(t) >= 1:
        return str(int(t))
    raise argparse.ArgumentTypeError(f"expected inf, gp or a positive integer width, got {text!r}")


def _count(minimum: int):
    def parse(text: str) -> int:
        t = text.strip()
        if not (t.isdigit() or (t.startswith("-") and t[1:].isdigit())) or int(t) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(t)
    parse.__name__ = "int"
    return parse


DOCS = ROOT / "docs" / "experiments.md"
HEADING = "## word2vec (TP4)"
PLANNED = ("64", "256", "1024", "inf", "gp")


def _label(width: str) -> str:
    return {"inf": "inf (exact limit)", "gp": "GP/NTK (exact, embeddings frozen)"}.get(width, width)


def docs_section(results: list[dict], stats: dict, notes: str = "") -> str:
    """The "word2vec (TP4)" section of docs/experiments.md from the runs' JSON results (and the
    results directory's NOTES.md, appended as written)."""
    order = {w: i for i, w in enumerate(PLANNED)}
    results = sorted(results, key=lambda r: (order.get(r["width"], -1), r["width"], r["epochs"], r["seed"]))
    lines = [HEADING, "",
             "TP4's word2vec (CBOW, negative sampling; edwardjhu/TP4 Word2Vec/src/word2vec.c) on gensim's bundled "
             "Wikipedia excerpt, trained through `tp.StepEngine` on the DSL template `programs/word2vec_cbow.py` "
             "under muP (width n: method \"finite\"; inf: method \"exact\" on a basis of V Gaussians; GP/NTK: "
             "the exact limit with the input embeddings frozen at init).  Protocol and evaluation: the docstring "
             "of `experiments/word2vec_tp4.py`; command "
             "`python experiments/word2vec_tp4.py --width inf|gp|N --epochs E --seed S --json OUT`.",
             "",
             f"Corpus: {stats['articles']} articles, {stats['tokens']:,} tokens, {stats['sentences']} sentences of at most "
             f"1000 tokens; V = {stats['V']:,} words with count >= 5, T = {stats['T']:,} in-vocabulary tokens, "
             f"{stats['kept']:,.0f} expected per epoch after subsampling (threshold 1e-4).  Analogy questions: "
             f"{stats['answerable']:,} of {stats['questions']:,} have all four words in the vocabulary.",
             "",
             "| width | epochs | seed | steps | correct / total | accuracy (%) | seconds (setup + train + eval) | steps/s | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        full = r["complete"] and r["epochs"] == EPOCHS
        run = "TP4's protocol" if full else (
            f"shortened: {r['epochs']} of {EPOCHS} epochs" + ("" if r["complete"] else f", training stopped after {r['steps']:,} steps"))
        lines.append(f"| {_label(r['width'])} | {r['epochs']} | {r['seed']} | {r['steps']:,} | {r['correct']} / {r['total']} "
                     f"| {r['accuracy']:.2f} | {r['seconds']:.0f} ({r['setup_seconds']:.0f} + {r['train_seconds']:.0f} + {r['eval_seconds']:.0f}) "
                     f"| {r['steps_per_second']:.0f} | {run} |")
    lines += _over_seeds(results, order)
    done = {r["width"] for r in results if r["complete"] and r["epochs"] == EPOCHS}
    missing = [_label(w) for w in PLANNED if w not in done]
    if missing:
        lines += ["", "Not run with TP4's full protocol (15 epochs): " + ", ".join(missing) + "."]
    if notes.strip():
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def _over_seeds(results: list[dict], order: dict) -> list[str]:
    """Lines summarising, per width run with TP4's protocol at two or more seeds, the correct
    answers of each seed and the mean and sample standard deviation of the accuracy (a seed run
    twice counts once: its first result)."""
    by_width: dict = {}
    for r in results:
        if r["complete"] and r["epochs"] == EPOCHS:
            by_width.setdefault(r["width"], {}).setdefault(r["seed"], r)
    lines = []
    for width in sorted(by_width, key=lambda w: (order.get(w, -1), w)):
        runs = [by_width[width][s] for s in sorted(by_width[width])]
        if len(runs) < 2:
            continue
        acc = np.array([r["accuracy"] for r in runs])
        lines.append(f"- {_label(width)}: seeds {', '.join(str(r['seed']) for r in runs)} answer "
                     f"{', '.join(str(r['correct']) for r in runs)} of {runs[0]['total']:,}: accuracy {acc.mean():.2f} % "
                     f"on average, standard deviation {acc.std(ddof=1):.2f} over the {len(runs)} seeds")
    return ["", "Over seeds (TP4's protocol):", ""] + lines if lines else []


def corpus_stats(corpus: "Corpus") -> dict:
    arts = read_articles()
    return {"articles": len(arts), "tokens": sum(map(len, arts)), "sentences": len(cut_sentences(arts)),
            "V": corpus.vocab.size, "T": corpus.vocab.total, "kept": corpus.expected_steps(),
            "answerable": len(corpus.qids), "questions": corpus.questions}


def write_docs(results_dir: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _machine import write_section

    results = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]
    if not DOCS.exists():
        DOCS.write_text("# Experiments\n")
    notes = Path(results_dir) / "NOTES.md"
    write_section(DOCS, HEADING, docs_section(results, corpus_stats(Corpus.load()),
                                              notes.read_text() if notes.exists() else ""))


def main(argv=None) -> int:
    ap = _Parser(description="TP4's word2vec experiment (CBOW, negative sampling) through tp.StepEngine")
    ap.add_argument("--width", type=_width, help="inf (exact limit), gp (frozen embeddings) or n")
    ap.add_argument("--epochs", type=_count(1), default=EPOCHS, help=f"epochs (TP4: {EPOCHS})")
    ap.add_argument("--seed", type=_count(0), default=0, help="seed of the data sampling and of the engine")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--max-steps", type=_count(1), help="stop after this many steps (a shortened run, labelled so)")
    ap.add_argument("--max-seconds", type=_count(1), help="stop training after this many seconds (labelled so)")
    ap.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--docs", metavar="DIR", help="write the word2vec section of docs/experiments.md from the JSON "
                    "results in DIR (instead of a run)")
    try:
        args = ap.parse_args(argv)
        if args.docs is not None:
            if args.width is not None:
                raise UsageError("--docs writes the table of earlier runs; give it without --width")
            if not Path(args.docs).is_dir():
                raise UsageError(f"argument --docs: {args.docs!r} is not a directory")
        elif args.width is None:
            raise UsageError("the following arguments are required: --width (or --docs DIR)")
        if args.json:
            out = Path(args.json)
            if out.exists() and out.is_dir():
                raise UsageError(f"argument --json: {args.json!r} is a directory")
            if not out.parent.is_dir():
                raise UsageError(f"argument --json: directory {str(out.parent)!r} does not exist")
    except UsageError as exc:
        print(f"word2vec_tp4.py: error: {exc}", file=sys.stderr)
        return 2
    if args.docs is not None:
        write_docs(Path(args.docs))
        return 0
    result = run(args.width, args.epochs, args.seed, args.max_steps, not args.no_progress, args.max_seconds)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
