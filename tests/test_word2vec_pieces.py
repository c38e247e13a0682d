"""The pieces of TP4's word2vec experiment (experiments/word2vec_tp4.py): the data pipeline
(sentences, vocabulary, word2vec.c's subsampling, windows, negatives and learning rate) on tiny
synthetic corpora, 3CosAdd on hand-made embeddings, and the corpus numbers of the real excerpt."""
from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import word2vec_tp4 as w2v


# -- corpus and vocabulary ------------------------------------------------------------------

def test_sentences_are_consecutive_pieces_of_each_article():
    arts = [list("abcdefg"), list("xy")]
    assert w2v.cut_sentences(arts, 3) == [list("abc"), list("def"), ["g"], list("xy")]
    assert w2v.cut_sentences([[]], 3) == []


def test_vocabulary_min_count_order_and_encoding():
    sents = [["b", "a", "b", "c"], ["a", "b", "d", "c"], ["c", "a", "e"]]
    voc = w2v.build_vocab(sents, min_count=2)
    # counts: a 3, b 3, c 3, d 1, e 1 -> ties ordered by the word
    assert voc.words == ("a", "b", "c") and voc.counts.tolist() == [3, 3, 3] and voc.total == 9
    enc = w2v.encode(sents + [["d", "e"]], voc)
    assert [e.tolist() for e in enc] == [[1, 0, 1, 2], [0, 1, 2], [2, 0]]  # "d e" is dropped whole
    voc3 = w2v.build_vocab([["x"] * 4 + ["y"] * 5 + ["z"] * 6], min_count=5)
    assert voc3.words == ("z", "y")


def test_corpus_numbers_of_the_wikipedia_excerpt():
    """The issue's V = 9044 (min_count 5 on WikiCorpus' tokens), and the token counts."""
    arts = w2v.read_articles()
    sents = w2v.cut_sentences(arts)
    voc = w2v.build_vocab(sents)
    assert (len(arts), sum(map(len, arts)), len(sents)) == (106, 469572, 524)
    assert voc.size == 9044 and voc.total == 428710
    assert max(map(len, sents)) == 1000


# -- word2vec.c's sampling ------------------------------------------------------------------

def test_subsampling_formula():
    """keep_w c_w = sqrt(c_w s T) + s T (the expected kept tokens of w) where that is below c_w."""
    counts = np.array([5000, 400, 30, 2])
    s = 1e-2
    st = s * counts.sum()
    keep = w2v.keep_probability(counts, s)
    expected = np.minimum(counts, np.sqrt(counts * st) + st)
    np.testing.assert_allclose(keep * counts, expected, rtol=1e-12)
    assert keep[-1] == 1.0 and keep[0] < keep[1] < keep[2] <= 1.0
    assert np.all(w2v.keep_probability(counts, 0.0) == 1.0)


def test_learning_rate_is_linear_with_a_floor():
    total = 999
    lr = w2v.learning_rate([0, 500, 1000, 5000], total, alpha=0.05, floor=1e-4)
    np.testing.assert_allclose(lr, [0.05, 0.05 * 0.5, 0.05 * 1e-4, 0.05 * 1e-4], rtol=1e-12)


def test_negatives_follow_the_unigram_power_and_skip_the_target():
    counts = np.array([81, 16, 1, 625])
    cdf = w2v.unigram_cdf(counts)
    p = counts ** 0.75 / np.sum(counts ** 0.75)  # 27, 8, 1, 125 over 161
    np.testing.assert_allclose(np.diff(cdf, prepend=0.0), p, rtol=1e-12)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 4, size=4000)
    steps = list(w2v.sentence_steps(ids, np.ones(4), cdf, rng, 0, window=2, negative=10))
    assert len(steps) == ids.size
    for st in steps:
        assert st.target not in st.negatives.tolist()
        assert st.negatives.size <= 10
        assert st.outputs()[0] == st.target and st.labels().tolist() == [1.0] + [0.0] * st.negatives.size
    # drawn negatives plus the skipped ones (one per match with the target) follow p:
    draws = np.zeros(4)
    for st in steps:
        draws += np.bincount(st.negatives, minlength=4)
        draws[st.target] += 10 - st.negatives.size
    n = draws.sum()
    assert n == 10 * len(steps)
    assert np.all(np.abs(draws / n - p) < 5 * np.sqrt(p * (1 - p) / n))


def test_windows_shrink_uniformly_and_stay_in_the_sentence():
    rng = np.random.default_rng(7)
    m, window = 200, 8
    ids = np.arange(m)  # word i at position i, nothing subsampled
    keep = np.ones(m)
    cdf = w2v.unigram_cdf(np.ones(m))
    steps = list(w2v.sentence_steps(ids, keep, cdf, rng, 1000, window=window, negative=2))
    assert [s.target for s in steps] == list(range(m))
    assert [s.words_read for s in steps] == list(range(1000, 1000 + m))
    reach = []
    for s in steps:
        t = s.target
        c = s.context
        r = max(abs(c - t))
        assert t not in c.tolist()
        # the context is every position at distance 1..r within the sentence, in order
        assert c.tolist() == [i for i in range(t - r, t + r + 1) if i != t and 0 <= i < m]
        if window <= t < m - window:  # away from the edges the reach is window - b exactly
            reach.append(r)
    hist = np.bincount(window - np.array(reach), minlength=window)
    assert hist.size == window and np.all(hist > 0)  # b takes every value 0..7
    n = len(reach)
    assert np.all(np.abs(hist / n - 1 / window) < 5 * math.sqrt((1 / window) * (1 - 1 / window) / n))


def test_subsampling_drops_tokens_and_positions_count_the_words_read():
    rng = np.random.default_rng(11)
    ids = np.array([0, 1] * 500)
    keep = np.array([1.0, 0.0])  # word 1 is always discarded
    steps = list(w2v.sentence_steps(ids, keep, w2v.unigram_cdf([1, 1]), rng, 0, window=3, negative=1))
    assert all(s.target == 0 and set(s.context.tolist()) == {0} for s in steps)
    assert [s.words_read for s in steps] == list(range(0, 1000, 2))
    # a sentence with one kept word has no context: no step
    assert list(w2v.sentence_steps(np.array([0, 1, 1]), keep, w2v.unigram_cdf([1, 1]), rng, 0)) == []


def test_context_mean_counts_repeated_words():
    st = w2v.Step(target=0, context=np.array([3, 1, 3, 5]), negatives=np.array([2]), words_read=0)
    cols, vals = st.context_mean(8)
    assert cols.tolist() == [1, 3, 5] and vals.tolist() == [0.25, 0.5, 0.25]


def test_epochs_are_reproducible_from_the_seed():
    enc = [np.array([0, 1, 2, 1, 0, 2, 2, 1]), np.array([2, 0, 1])]
    keep = np.array([0.9, 0.6, 1.0])
    cdf = w2v.unigram_cdf([5, 3, 2])

    def run(seed):
        rng = np.random.default_rng(seed)
        return [(s.target, s.context.tolist(), s.negatives.tolist(), s.words_read)
                for e in range(2) for s in w2v.epoch_steps(enc, keep, cdf, rng, e, 11, window=2, negative=3)]

    a, b, c = run(5), run(5), run(6)
    assert a == b and a != c
    assert {s[3] for s in a} <= set(range(22)) and max(s[3] for s in a) >= 11  # epoch 2 continues the count


# -- evaluation -----------------------------------------------------------------------------

def test_3cosadd_on_hand_made_embeddings():
    """Words 0..5 in R^3.  man = e1, woman = e1 + e2 (normalised), king = e1 + e3,
    queen = e1 + e2 + e3, x = -e3, y = e2 - e1 (cosines worked out by hand).  king - man + woman
    is nearest to queen (cos 0.975; woman and king 0.732); for man : x :: king : ? the query
    (-0.293, 0, -0.293) is nearest to x itself (cos 0.707), so y (0.5) wins only because the
    question words are excluded."""
    E = np.array([
        [1.0, 0.0, 0.0],   # 0 man
        [1.0, 1.0, 0.0],   # 1 woman
        [1.0, 0.0, 1.0],   # 2 king
        [1.0, 1.0, 1.0],   # 3 queen
        [0.0, 0.0, -1.0],  # 4 distractor
        [-1.0, 1.0, 0.0],  # 5 distractor
    ]) * np.array([[3.0], [0.5], [2.0], [7.0], [1.0], [4.0]])  # norms must not matter
    embed = lambda idx: E[idx]  # noqa: E731
    questions = [("man", "woman", "king", "queen"), ("woman", "man", "queen", "king"),
                 ("man", "king", "woman", "queen"), ("man", "woman", "king", "unknownword"),
                 ("man", "woman", "king", "woman"), ("man", "x", "king", "y")]
    index = {"man": 0, "woman": 1, "king": 2, "queen": 3, "x": 4, "y": 5}
    qids = w2v.question_ids(questions, index)
    assert qids.tolist() == [[0, 1, 2, 3], [1, 0, 3, 2], [0, 2, 1, 3], [0, 1, 2, 1], [0, 4, 2, 5]]  # OOV one skipped
    for chunk in (1, 4, 1024):  # the chunked scan gives the same answers
        assert w2v.analogy_correct(embed, 6, qids, chunk=chunk) == 4  # [0, 1, 2, 1]: d is a question word
    # a wrong answer: make y the nearest to man - woman + queen (question 2)
    E2 = E.copy()
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    E2[5] = unit(E[0]) - unit(E[1]) + unit(E[3])
    assert w2v.analogy_correct(lambda idx: E2[idx], 6, qids[1:2]) == 0


def test_3cosadd_matches_a_brute_force_scan():
    rng = np.random.default_rng(0)
    V, D = 50, 7
    E = rng.standard_normal((V, D))
    qids = rng.integers(0, V, size=(300, 4))
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    correct = 0
    for a, b, c, d in qids:
        s = U @ (U[b] - U[a] + U[c])
        s[[a, b, c]] = -np.inf
        correct += int(np.argmax(s) == d)
    assert correct > 0
    assert w2v.analogy_correct(lambda idx: E[idx], V, qids, chunk=16) == correct


def test_questions_file_is_read_lowercased():
    qs = w2v.read_questions()
    assert len(qs) == 19544 and qs[0] == ("athens", "greece", "baghdad", "iraq")


# -- word2vec.c's CBOW step in numpy: the independent oracle of the engine tests ---------------

def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def w2v_step(E, O, context, outputs, labels, alpha, wd=0.0, simultaneous=False):
    """One CBOW negative-sampling step of TP4's word2vec.c on input rows E (V x n) and output
    rows O (V x n): e = mean of the context rows; for each output k in order f = e . O_k,
    g = alpha (y - sigmoid(f)), neu1e += g O_k, O_k <- (1 - alpha wd) O_k + g e; then every context
    position's row E_w <- (1 - alpha wd) E_w + neu1e / |C|.  (TP4's sigmoid is a table clipped
    at |f| = 12; here the exact sigmoid.)  ``simultaneous``: every f_k from the old O (one
    gradient step; differs from word2vec.c only when an output is drawn twice)."""
    E, O = E.copy(), O.copy()
    O_old = O.copy()
    cw = len(context)
    e = E[context].sum(axis=0) / cw
    neu1e = np.zeros_like(e)
    for k, y in zip(outputs, labels):
        Ok = O_old[k] if simultaneous else O[k]
        g = alpha * (y - sigmoid(e @ Ok))
        neu1e += g * Ok
        O[k] = (1.0 - alpha * wd) * O[k] + g * e
    for w in context:
        E[w] = (1.0 - alpha * wd) * E[w] + neu1e / cw
    return E, O


def test_the_oracle_is_sgd_on_the_negative_sampling_loss():
    """Without weight decay and with distinct outputs, w2v_step is E, O <- E, O - alpha grad L,
    L = sum_k logistic loss of f_k = (mean of the context rows) . O_k, checked by central finite
    differences (a word repeated in the context counts twice in the mean)."""
    rng = np.random.default_rng(1)
    V, n, alpha = 5, 4, 0.3
    E, O = rng.standard_normal((V, n)), rng.standard_normal((V, n))
    context, outputs, labels = np.array([1, 3, 1]), np.array([2, 0, 4]), np.array([1.0, 0.0, 0.0])

    def loss(E, O):
        f = O[outputs] @ E[context].mean(axis=0)
        return -np.sum(labels * np.log(sigmoid(f)) + (1 - labels) * np.log(sigmoid(-f)))

    E1, O1 = w2v_step(E, O, context, outputs, labels, alpha)
    h = 1e-6
    for M, M1, which in ((E, E1, 0), (O, O1, 1)):
        grad = np.zeros_like(M)
        for idx in np.ndindex(*M.shape):
            Mp, Mm = M.copy(), M.copy()
            Mp[idx] += h
            Mm[idx] -= h
            args_p = (Mp, O) if which == 0 else (E, Mp)
            args_m = (Mm, O) if which == 0 else (E, Mm)
            grad[idx] = (loss(*args_p) - loss(*args_m)) / (2 * h)
        np.testing.assert_allclose(M1 - M, -alpha * grad, atol=1e-8)
    # weight decay shrinks the touched rows only (row 1 twice: it is in the context twice)
    E2, O2 = w2v_step(E, O, context, outputs, labels, alpha, wd=0.5)
    d = 1 - 0.5 * alpha
    np.testing.assert_allclose(E2[[0, 2, 4]], E[[0, 2, 4]])
    np.testing.assert_allclose(O2[[1, 3]], O[[1, 3]])
    np.testing.assert_allclose(E2[3], d * E[3] + (E1[3] - E[3]), atol=1e-14)
    np.testing.assert_allclose(E2[1], d * (d * E[1] + (E1[1] - E[1]) / 2) + (E1[1] - E[1]) / 2, atol=1e-14)


# -- command line and the docs table --------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--width", "0"], "argument --width: expected inf, gp or a positive integer width, got '0'"),
    (["--width", "wide"], "argument --width"),
    (["--width", "inf", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    (["--width", "inf", "--seed", "-1"], "argument --seed"),
    (["--width", "64", "--json", "/nonexistent-dir/out.json"], "directory '/nonexistent-dir' does not exist"),
    ([], "required: --width"),
    (["--docs", "/nonexistent-dir"], "is not a directory"),
])
def test_bad_command_lines_fail_in_one_line(argv, message, capsys):
    assert w2v.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_docs_table_labels_shortened_runs():
    stats = {"articles": 106, "tokens": 469572, "sentences": 524, "V": 9044, "T": 428710, "kept": 238210.1,
             "answerable": 1000, "questions": 19544}
    row = dict(seed=0, vocab=9044, correct=50, total=1000, accuracy=5.0, seconds=120.0, setup_seconds=20.0, train_seconds=90.0,
               eval_seconds=10.0, steps=1000, steps_per_second=11.1)
    runs = [dict(row, width="inf", epochs=15, complete=True), dict(row, width="64", epochs=1, complete=True),
            dict(row, width="256", epochs=15, complete=False)]
    text = w2v.docs_section(runs, stats)
    assert text.startswith(w2v.HEADING + "\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| 64", "| 256", "| inf (exact limit)"]
    assert "shortened: 1 of 15 epochs |" in rows[0] and "training stopped after 1,000 steps" in rows[1]
    assert "TP4's protocol" in rows[2] and "| 5.00 |" in rows[2] and "| 120 (20 + 90 + 10) |" in rows[2]
    assert text.rstrip().endswith("Not run with TP4's full protocol (15 epochs): 64, 256, 1024, "
                                  "GP/NTK (exact, embeddings frozen).")
    assert w2v.docs_section(runs, stats, "Some notes.\n").rstrip().endswith("frozen).\n\nSome notes.")


def test_docs_summarise_the_seeds_of_each_width():
    """Widths run with TP4's protocol at two or more seeds get a line each: the counts per seed,
    the mean and the sample standard deviation of the accuracy (a seed run twice counts once);
    shortened runs and single seeds get none."""
    stats = {"articles": 106, "tokens": 469572, "sentences": 524, "V": 9044, "T": 428710, "kept": 238210.1,
             "answerable": 1000, "questions": 19544}
    row = dict(vocab=9044, total=1000, seconds=120.0, setup_seconds=20.0, train_seconds=90.0, eval_seconds=10.0,
               steps=1000, steps_per_second=11.1, epochs=15, complete=True)
    runs = [dict(row, width="inf", seed=s, correct=c, accuracy=c / 10) for s, c in ((2, 70), (0, 60), (1, 50))]
    runs += [dict(row, width="inf", seed=0, correct=99, accuracy=9.9),   # seed 0 again: the first counts
             dict(row, width="1024", seed=0, correct=40, accuracy=4.0),  # one seed: no line
             dict(row, width="256", seed=1, correct=30, accuracy=3.0, epochs=1)]  # shortened: no line
    text = w2v.docs_section(runs, stats)
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert lines == ["- inf (exact limit): seeds 0, 1, 2 answer 60, 50, 70 of 1,000: accuracy 6.00 % on average, "
                     "standard deviation 1.00 over the 3 seeds"]
    assert "Over seeds (TP4's protocol):" in text


def test_fast_csr_row_is_the_checked_csr_row():
    import scipy.sparse as sps

    rng = np.random.default_rng(4)
    for size in (1, 3, 9):
        cols = np.sort(rng.choice(50, size=size, replace=False))
        vals = rng.uniform(size=size)
        X = w2v.csr_row(cols, vals, 50)
        Y = sps.csr_matrix((vals, cols, np.array([0, size])), shape=(1, 50))
        X.check_format(full_check=True)
        assert sps.isspmatrix_csr(X) and X.shape == (1, 50) and X.nnz == size and X.has_canonical_format
        np.testing.assert_array_equal(X.toarray(), Y.toarray())
        np.testing.assert_array_equal((X @ np.arange(50.0)), (Y @ np.arange(50.0)))


# -- the network through the step engine against the numpy oracle ---------------------------

def _episode(V, steps, rng, repeats=True):
    """Random CBOW steps: a context of 1..4 words (repeats allowed if ``repeats``), a target and
    3 distinct negatives different from it (distinct outputs: word2vec.c's sequential loop and
    one simultaneous gradient step then coincide)."""
    out = []
    for _ in range(steps):
        size = int(rng.integers(1, 5))
        context = rng.integers(0, V, size=size) if repeats else rng.choice(V, size=size, replace=False)
        outputs = rng.choice(V, size=4, replace=False)
        out.append((context, outputs, np.array([1.0, 0.0, 0.0, 0.0]), float(rng.uniform(0.1, 0.6))))
    return out


def _engine_step(eng, V, context, outputs, labels, lr):
    st = w2v.Step(int(outputs[0]), np.asarray(context), np.asarray(outputs[1:]), 0)
    cols, vals = st.context_mean(V)
    X = w2v.csr_row(cols, vals, V)
    eng.step(X, labels[None, :], lr, outputs=np.asarray(outputs)[None, :])


def _compare(eng, V, E, O, episode):
    X = np.vstack([np.eye(V)] + [np.bincount(c, minlength=V) / len(c) for c, *_ in episode[:3]])
    mean, err = eng.predict(X)
    emb = X @ E  # e(xi) = sum_w xi_w E_w
    np.testing.assert_allclose(mean, emb @ O.T, rtol=1e-9, atol=1e-11)
    F = np.asarray(eng.features(np.eye(V)))
    gram = np.einsum("rid,rjd->ij", F, F) / F.shape[0]
    np.testing.assert_allclose(gram, E @ E.T, rtol=1e-9, atol=1e-11)


def test_exact_limit_is_tp4s_one_hot_word2vec():
    """The n -> infinity limit of word2vec.c is word2vec.c on a basis: input rows E = I (V x V,
    the coefficients of the V initial Gaussians U_w), output rows 0 (TP4 ran it with 2V columns).
    The engine's exact method on programs/word2vec_cbow.py under muP must reproduce it to
    rounding: f on one-hot and context inputs, and the embedding Gram matrix E E^T."""
    import tpcompiler as tp

    V = 6
    rng = np.random.default_rng(0)
    episode = _episode(V, 10, rng)
    eng = tp.StepEngine(w2v.network(V), tp.named("mup", 1), method="exact", loss="negative_sampling")
    E, O = np.eye(V), np.zeros((V, V))
    for context, outputs, labels, lr in episode:
        _engine_step(eng, V, context, outputs, labels, lr)
        E, O = w2v_step(E, O, context, outputs, labels, lr)
    assert np.abs(O).max() > 0.05 and np.abs(E - np.eye(V)).max() > 0.01  # the steps moved both
    _compare(eng, V, E, O, episode)


def test_finite_width_is_word2vec_c_at_width_n():
    """At width n = 32 the engine's network is word2vec.c started from the engine's own initial
    rows E_0 (read from features at step 0: E[Z^h(e_a) Z^h(e_b)] at width n is E_0a . E_0b),
    whose entries must be N(0, 1/n)."""
    import tpcompiler as tp

    V, n = 6, 32
    rng = np.random.default_rng(1)
    episode = _episode(V, 10, rng)
    eng = tp.StepEngine(w2v.network(V), tp.named("mup", 1), method="finite", width=n, seeds=1, seed=3,
                        loss="negative_sampling")
    F0 = np.asarray(eng.features(np.eye(V)))
    assert F0.shape == (1, V, n)
    E = F0[0]
    assert abs(np.mean(E**2) * n - 1) < 5 * math.sqrt(2 / (V * n))  # N(0, 1/n) entries
    O = np.zeros((V, n))
    for context, outputs, labels, lr in episode:
        _engine_step(eng, V, context, outputs, labels, lr)
        E, O = w2v_step(E, O, context, outputs, labels, lr)
    _compare(eng, V, E, O, episode)


def test_gp_baseline_keeps_the_embeddings():
    """frozen=True: only the output rows learn; the embeddings stay the basis (exact limit)."""
    import tpcompiler as tp

    V = 5
    rng = np.random.default_rng(2)
    episode = _episode(V, 6, rng)
    eng = tp.StepEngine(w2v.network(V, frozen=True), tp.named("mup", 1), method="exact", loss="negative_sampling")
    E, O = np.eye(V), np.zeros((V, V))
    for context, outputs, labels, lr in episode:
        _engine_step(eng, V, context, outputs, labels, lr)
        _, O = w2v_step(E, O, context, outputs, labels, lr)
    assert np.abs(O).max() > 0.05
    _compare(eng, V, E, O, episode)


def test_a_negative_drawn_twice_counts_twice_in_one_gradient_step():
    """Repeated outputs (a negative drawn twice, as unigram sampling does): the engine takes one
    gradient step, both copies' f at the old weights, their updates summed."""
    import tpcompiler as tp

    V = 5
    eng = tp.StepEngine(w2v.network(V), tp.named("mup", 1), method="exact", loss="negative_sampling")
    E, O = np.eye(V), np.zeros((V, V))
    steps = [([0, 1], [2, 3, 3, 4], 0.5), ([2, 2, 4], [1, 0, 3, 0], 0.4), ([3], [0, 1, 1, 1], 0.3),
             ([0, 4], [3, 2, 2, 1], 0.5)]
    for context, outputs, lr in steps:
        labels = np.array([1.0, 0.0, 0.0, 0.0])
        _engine_step(eng, V, np.array(context), np.array(outputs), labels, lr)
        E, O = w2v_step(E, O, context, outputs, labels, lr, simultaneous=True)
    Es, Os = np.eye(V), np.zeros((V, V))
    for context, outputs, lr in steps:
        Es, Os = w2v_step(Es, Os, context, outputs, np.array([1.0, 0.0, 0.0, 0.0]), lr)
    assert np.abs(Os - O).max() > 1e-4  # word2vec.c's sequential loop is another update
    _compare(eng, V, E, O, [(np.array(c), None, None, None) for c, _, _ in steps])


@pytest.mark.parametrize("method", ["exact", "finite"])
def test_weight_decay_of_the_touched_rows_is_word2vec_cs(method):
    """decay_rows="touched": each step shrinks only the context words' input rows and the
    sampled output rows by (1 - lr lambda) before adding the update, as word2vec.c does (distinct
    context words here: word2vec.c decays a repeated context word once per occurrence)."""
    import tpcompiler as tp

    V, n, wd = 6, 16, 0.3
    rng = np.random.default_rng(5)
    episode = _episode(V, 10, rng, repeats=False)
    kw = dict(width=n, seeds=1) if method == "finite" else {}
    eng = tp.StepEngine(w2v.network(V), tp.named("mup", 1), method=method, loss="negative_sampling",
                        weight_decay=wd, decay_rows="touched", **kw)
    E = np.asarray(eng.features(np.eye(V)))[0] if method == "finite" else np.eye(V)
    O = np.zeros_like(E)
    for context, outputs, labels, lr in episode:
        _engine_step(eng, V, context, outputs, labels, lr)
        E, O = w2v_step(E, O, context, outputs, labels, lr, wd=wd)
    _compare(eng, V, E, O, episode)
    # the same run with every row decaying at every step is another network
    dense = tp.StepEngine(w2v.network(V), tp.named("mup", 1), method=method, loss="negative_sampling",
                          weight_decay=wd, **kw)
    for context, outputs, labels, lr in episode:
        _engine_step(dense, V, context, outputs, labels, lr)
    assert np.abs(dense.predict(np.eye(V))[0] - eng.predict(np.eye(V))[0]).max() > 1e-3


def test_frozen_embeddings_do_not_decay():
    import tpcompiler as tp

    V = 4
    eng = tp.StepEngine(w2v.network(V, frozen=True), tp.named("mup", 1), method="exact", loss="negative_sampling",
                        weight_decay=0.5)
    _engine_step(eng, V, np.array([0, 1]), np.array([2, 3]), np.array([1.0, 0.0]), 0.5)
    F = np.asarray(eng.features(np.eye(V)))[0]
    np.testing.assert_allclose(F @ F.T, np.eye(V), atol=1e-14)


def test_embeddings_in_small_batches_are_the_engine_features():
    import tpcompiler as tp

    V = 7
    rng = np.random.default_rng(6)
    eng = tp.StepEngine(w2v.network(V), tp.named("mup", 1), method="exact", loss="negative_sampling")
    for context, outputs, labels, lr in _episode(V, 5, rng):
        _engine_step(eng, V, context, outputs, labels, lr)
    idx = np.array([6, 0, 3, 3, 5])
    F = np.asarray(eng.features(np.eye(V)[idx]))[0]
    np.testing.assert_allclose(w2v.embeddings(eng, V)(idx, part=2), F, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("width", ["inf", "8"])
def test_training_in_chunks_is_stepping_one_by_one(width):
    """train() hands the engine chunks of steps (w2v.Chunk -> StepEngine.steps: the exact limit's
    compiled loop, finite widths step by step); the tables must be those of one step() per step."""
    V = 12
    episode = _episode(V, 50, np.random.default_rng(5))
    one, chunked = w2v.make_engine(width, V, 0), w2v.make_engine(width, V, 0)
    chunk = w2v.Chunk(V)
    for context, outputs, labels, lr in episode:
        _engine_step(one, V, context, outputs, labels, lr)
        cols, vals = w2v.Step(int(outputs[0]), np.asarray(context), np.asarray(outputs[1:]), 0).context_mean(V)
        chunk.add(cols, vals, np.asarray(outputs), labels, lr)
        if len(chunk) == 17:  # chunks of unequal sizes, the last one partial
            chunk.run(chunked)
    assert chunk.run(chunked) == 50 % 17
    probe = np.eye(V)
    np.testing.assert_allclose(chunked.predict(probe)[0], one.predict(probe)[0], rtol=0, atol=1e-12)
    assert np.abs(one.predict(probe)[0]).max() > 0.1
    np.testing.assert_allclose(np.asarray(chunked.features(probe)), np.asarray(one.features(probe)), rtol=0, atol=1e-12)
