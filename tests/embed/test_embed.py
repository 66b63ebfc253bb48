"""Task embeddings: known answers for the pieces, and the Task2Vec sanity check on real
task families (the MiniLM probe on WordNet supersenses and fortune topics, the
pretrained MLP on digits)."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from metapeft_dist.config import load_spec
from metapeft_dist.embed import (ProbeError, TaskSample, distance, family_samples,
                                 make_embedder, probe_from_job, probe_from_model)
from metapeft_dist.embed import handcrafted, learned, task2vec
from metapeft_dist.job import build_job
from metapeft_dist.models import Model

from conftest import JOBS


def within_beats_between(groups: list[np.ndarray]) -> float:
    """Share of triples (a, a', b), a and a' in one group and b in another, with
    d(a, a') < d(a, b)."""
    wins = total = 0
    for g, group in enumerate(groups):
        others = [e for h, other in enumerate(groups) if h != g for e in other]
        for i, k in itertools.permutations(range(len(group)), 2):
            near = distance(group[i], group[k])
            for b in others:
                wins += near < distance(group[i], b)
                total += 1
    return wins / total


def test_distance_known_answers():
    a = np.array([1.0, 2.0, 3.0])
    assert distance(a, 5 * a) == pytest.approx(0.0, abs=1e-12)  # ratio form: scale-free
    assert distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    # a / (a + b) = (0.5, 0.25), b / (a + b) = (0.5, 0.75): cos = 0.4375 / sqrt(0.3125 * 0.8125)
    assert distance([1.0, 1.0], [1.0, 3.0]) == pytest.approx(1 - 0.4375 / np.sqrt(0.3125 * 0.8125))
    assert distance([1.0, -1.0], [-1.0, 1.0]) == pytest.approx(2.0)  # signed: plain cosine
    assert distance([0.0, 0.0], [1.0, 0.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different sizes"):
        distance([1.0], [1.0, 2.0])


def test_handcrafted_label_and_text_features():
    assert handcrafted.label_features(np.array([0, 0, 1, 1, 1])) == pytest.approx(
        [np.log(6), 2, 2 / 3, -(0.4 * np.log(0.4) + 0.6 * np.log(0.6)) / np.log(2)])
    texts = ["The cat sat", "a cat ran", "Dogs bark 2", "dogs chase a cat"]
    stats = handcrafted.text_statistics(texts, np.array([0, 0, 1, 1]))
    # 13 words, 9 distinct lower-case; class vocabularies {the cat sat a ran} and
    # {dogs bark 2 chase a cat} share 2 of 9 words; 2 capitalized; 1 of 38 non-space
    # characters is not a letter
    assert stats == pytest.approx([np.mean([11, 9, 11, 16]) / 100, 13 / 4 / 20, 9 / 13,
                                   2 / 9, 2 / 13, 1 / 38])


def _toy_probe():
    model = Model("mlp", (3,), (4,), 2)
    params = model.init(mx.random.key(3))
    return probe_from_model(model, params, "toy"), params


def test_probe_features_are_the_base_output():
    probe, params = _toy_probe()
    x = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], dtype=np.float32)
    kernel = np.array(params["hidden0.kernel"])  # (in, out)
    expected = np.maximum(x @ kernel + np.array(params["hidden0.b"]), 0)
    np.testing.assert_allclose(probe.features(x), expected, rtol=1e-5, atol=1e-6)
    assert probe.base_names == ("hidden0.b", "hidden0.kernel")


def test_fisher_matches_per_example_gradients(monkeypatch):
    """The vmapped exact-expectation Fisher against a loop over examples and classes."""
    probe, _ = _toy_probe()
    x = mx.array(np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32))
    head = (mx.array([[1.0, -0.5, 0.2, 0.3], [-0.4, 0.6, 0.1, -0.2]]), mx.array([0.1, -0.1]))
    fisher = task2vec.fisher_diagonal(probe, head, x)
    expected = {k: np.zeros(v.shape) for k, v in probe.base().items()}
    for i in range(5):
        logits = probe.forward(probe.base(), x[i:i + 1]) @ head[0].T + head[1]
        p = np.array(mx.softmax(logits, axis=-1))[0]
        for c in range(2):
            def logp(base, c=c, i=i):
                lg = probe.forward(base, x[i:i + 1]) @ head[0].T + head[1]
                return (lg - mx.logsumexp(lg, axis=-1, keepdims=True))[0, c]
            for k, g in mx.grad(logp)(probe.base()).items():
                expected[k] += p[c] * np.array(g) ** 2 / 5
    for k in expected:
        np.testing.assert_allclose(np.array(fisher[k]), expected[k], rtol=1e-4, atol=1e-9)
    # Per output unit: the kernel (3, 4) averages over its 3 inputs; the bias stays.
    vector = task2vec.per_unit(fisher, probe.base_names)
    np.testing.assert_allclose(vector, np.concatenate([expected["hidden0.b"],
                                                       expected["hidden0.kernel"].mean(axis=0)]),
                               rtol=1e-4, atol=1e-9)
    # What Task2Vec computes, from per-position output gradients and the inputs' Gram
    # matrices: the same per-unit sums in another order (float32 rounding apart).
    np.testing.assert_allclose(task2vec.fisher_per_unit(probe, head, x), vector,
                               rtol=1e-4, atol=1e-9)
    # A model whose layers record nothing: every weight by per-example gradients.
    from metapeft_dist.models import lora

    monkeypatch.setattr(lora, "record_input", lambda *args: None)
    np.testing.assert_allclose(task2vec.fisher_per_unit(probe, head, x), vector,
                               rtol=1e-4, atol=1e-9)


def test_the_gram_fisher_of_a_conv_net_is_its_per_example_fisher():
    """The conv net's kernels through their im2col patches (per filter: 9 x in
    entries), two conv blocks and the head's input, against per-example gradients."""
    model = Model("conv", (6, 6, 2), (3, 4), 3)
    params = model.init(mx.random.key(1))
    probe = probe_from_model(model, params, "conv")
    x = mx.array(np.random.default_rng(1).normal(size=(4, 6, 6, 2)).astype(np.float32))
    head = (mx.array(np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)),
            mx.zeros((3,)))
    expected = task2vec.per_unit(task2vec.fisher_diagonal(probe, head, x), probe.base_names)
    assert expected.shape == (3 + 3 + 4 + 4,) and expected.min() > 0
    np.testing.assert_allclose(task2vec.fisher_per_unit(probe, head, x), expected,
                               rtol=1e-4, atol=1e-12)


def test_head_fits_a_separable_task():
    features = np.array([[3.0, 0.0], [2.5, 0.5], [0.0, 3.0], [0.5, 2.5]])
    w, b = task2vec.train_head(features, np.array([0, 0, 1, 1]), 2)
    predicted = np.argmax(features @ np.array(w).T + np.array(b), axis=1)
    assert predicted.tolist() == [0, 0, 1, 1]


def test_a_causal_lm_has_no_probe():
    class Lm:
        kind = "causal_lm"

    with pytest.raises(ProbeError, match="verbalized labels"):
        probe_from_model(Lm(), {}, "lm")


@pytest.fixture(scope="module")
def text_jobs():
    return {name: build_job(load_spec(JOBS / f"{name}-fomaml.yaml"))
            for name in ("wordnet", "fortunes")}


def test_task2vec_tells_text_families_apart(text_jobs):
    """Held-out tasks of WordNet supersenses and of fortune topics through the MiniLM
    probe: a task is nearer another task of its family than a task of the other family
    in >= 90% of triples (measured: 94.7% with 6 tasks a family)."""
    groups = []
    for job in text_jobs.values():
        probe = probe_from_job(job)
        groups.append(make_embedder("task2vec", probe).embed(family_samples(job, "test", 7, 6)))
    assert groups[0].shape == (6, 8448)  # per unit of MiniLM's top layer
    # What Task2Vec computed, the Gram form (layer norms by per-position taps) on the
    # task's texts cut to the longest, equals the per-example Fisher through the whole
    # padded states up to float32 rounding (other shapes, other kernels).
    job = text_jobs["wordnet"]
    probe, task = probe_from_job(job), family_samples(job, "test", 7, 1)[0]
    x = mx.array(task.x)
    features = probe.features(task.x)  # in order of length, cut
    np.testing.assert_allclose(features, np.array(probe.forward(probe.base(), x)),
                               rtol=1e-4, atol=1e-5)
    head = task2vec.train_head(features, task.y, task.ways)
    np.testing.assert_allclose(
        groups[0][0], task2vec.per_unit(task2vec.fisher_diagonal(probe, head, x),
                                        probe.base_names), rtol=1e-4, atol=1e-12)
    share = within_beats_between(groups)
    print(f"task2vec within-family nearer than between in {share:.1%} of triples")
    assert share >= 0.9


def test_handcrafted_and_learned_on_text_families(text_jobs, tmp_path):
    probes = {name: probe_from_job(job) for name, job in text_jobs.items()}
    samples = {name: family_samples(job, "test", 7, 6) for name, job in text_jobs.items()}
    hand = [handcrafted.Handcrafted(probes[n]).embed(samples[n]) for n in text_jobs]
    assert hand[0].shape == (6, len(handcrafted.NAMES))
    assert within_beats_between(hand) >= 0.8

    sources = [learned.class_features(probes[n], [job.family.members[c]
                                                   for c in job.family.splits["train"]])
               for n, job in text_jobs.items()]
    embedder, losses = learned.fit(probes["wordnet"], sources, ways=5, shots=5,
                                   names=list(text_jobs), steps=150)
    # InfoNCE over 32 tasks starts at log(32) = 3.47 and must drop well below it.
    assert losses[0] == pytest.approx(np.log(32), abs=0.3)
    assert np.mean(losses[-10:]) < 1.5
    # Held-out tasks of the two families fall apart (the network never saw their
    # categories; measured: 93% of triples).
    held = [learned.LearnedEmbedder(probes[n], embedder.params, embedder.info).embed(samples[n])
            for n in text_jobs]
    share = within_beats_between(held)
    print(f"learned: within-family nearer than between in {share:.1%} of triples")
    assert share >= 0.7
    halves = [samples["wordnet"][:2]]
    e1 = held[0][:2]

    path = embedder.save(tmp_path / "embed.safetensors")
    again = make_embedder("learned", probes["wordnet"], path)
    np.testing.assert_allclose(again.embed(halves[0]), e1, rtol=1e-5)
    with pytest.raises(ValueError, match="trained on the features of"):
        learned.LearnedEmbedder.load(path, _toy_probe()[0])
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="cannot read a task-embedding network"):
        learned.LearnedEmbedder.load(tmp_path / "bad.safetensors", probes["wordnet"])


def test_task2vec_on_digits_tells_class_sets_apart():
    """Digits through the MLP pretrained on the meta-train digits: tasks over one of two
    disjoint sets of 5 held-out classes (different images, shuffled labels) are nearer
    tasks of their own set (measured: 100% of triples)."""
    from metapeft_dist.tasks.digits import split_classes

    job = build_job(load_spec(JOBS / "digits-fomaml.yaml"))
    probe = probe_from_job(job)
    pool = split_classes("test")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pool))
    groups = []
    for classes in (order[:5], order[5:]):
        tasks = []
        for _ in range(5):
            labels = rng.permutation(5)
            xs = [job.family.classes[pool[c]][rng.choice(174, 5, replace=False)] for c in classes]
            tasks.append(TaskSample(np.concatenate(xs), np.repeat(labels, 5).astype(np.int32)))
        groups.append(make_embedder("task2vec", probe).embed(tasks))
    assert within_beats_between(groups) >= 0.9
    hand = [make_embedder("handcrafted", probe).embed_one(TaskSample(t.x, t.y))
            for t in tasks[:1]]
    assert hand[0][-3:].tolist() != [0.0, 0.0, 0.0]  # pixel statistics for images
