"""Choosing how to adapt a task from its embedding: the outcome predictor and the
similarity rule with known answers, the outcome store, and `metapeft embed` /
`metapeft adapt --init auto` on a real encoder run."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from test_adapt import _cli, _run, _write_task

from metapeft_dist.config import parse_spec
from metapeft_dist.selection import (Centroid, Choice, Outcome, OutcomePredictor,
                                     OutcomeStore, SelectionError, choose_by_similarity,
                                     configurations, global_best, peft_name)


def _outcome(task, config, accuracy, vector):
    return Outcome(task, config, accuracy, np.asarray(vector, dtype=float), "task2vec", "p",
                   5, 10)


def test_predictor_follows_the_nearest_recorded_tasks():
    # Tasks near (1, 0) adapt best with "a", tasks near (0, 1) with "b".
    records = []
    for i in range(10):
        near_a, near_b = [1.0, 0.05 * i], [0.05 * i, 1.0]
        records += [_outcome(f"a{i}", "a", 0.9, near_a), _outcome(f"a{i}", "b", 0.5, near_a),
                    _outcome(f"b{i}", "a", 0.4, near_b), _outcome(f"b{i}", "b", 0.8, near_b)]
    predictor = OutcomePredictor(records, neighbours=5)
    assert predictor.tasks == 20
    pick, why, predictions = predictor.choose(np.array([1.0, 0.1]))
    assert pick == "a" and predictions["a"]["accuracy"] == pytest.approx(0.9)
    assert predictions["b"]["accuracy"] == pytest.approx(0.5)
    assert "5 nearest of 20 recorded tasks" in why and why.index("a 90.0%") < why.index("b")
    assert predictor.choose(np.array([0.1, 1.0]))[0] == "b"
    assert predictor.choose(np.array([1.0, 0.1]), allowed=["b"])[0] == "b"
    with pytest.raises(SelectionError, match="no recorded outcomes"):
        predictor.choose(np.array([1.0, 0.0]), allowed=["c"])
    # Means: a (0.9 + 0.4) / 2 = 0.65, b (0.5 + 0.8) / 2 = 0.65 + 0.0; add one to break it.
    assert global_best(records + [_outcome("x", "b", 1.0, [1, 1])]) == "b"


def test_similarity_picks_the_nearest_run_within_its_radius():
    centroids = [Centroid("/runs/wordnet", "task2vec", "p", np.array([1.0, 0.2, 0.2]), 0.1,
                          "lora-r4-s2-top1"),
                 Centroid("/runs/fortunes", "task2vec", "p", np.array([0.2, 1.0, 0.2]), 0.1,
                          "lora-r2-s1-top2")]
    choice, why, dists = choose_by_similarity(np.array([1.0, 0.25, 0.2]), centroids)
    assert choice == Choice("/runs/wordnet", "meta") and "run wordnet's tasks are near" in why
    assert dists["/runs/wordnet"] < dists["/runs/fortunes"]
    far, why, _ = choose_by_similarity(np.array([0.2, 0.2, 1.0]), centroids)
    assert far == Choice("/runs/wordnet", "standard", "lora-r4-s2-top1")
    assert "beyond its radius" in why and far.key == "standard:lora-r4-s2-top1"
    assert Choice("/runs/wordnet", "meta").key == "meta:wordnet"
    assert Choice("/runs/wordnet", "head").key == "head"


def test_similarity_weighs_the_runs_own_evaluations():
    wordnet = np.array([1.0, 0.2, 0.2])
    centroids = [Centroid("/runs/fomaml", "task2vec", "p", wordnet, 0.1, "lora-r4-s2-top1"),
                 Centroid("/runs/hyper", "task2vec", "p", wordnet, 0.1, "lora-r4-s2-top1"),
                 Centroid("/runs/fortunes", "task2vec", "p", np.array([0.2, 1.0, 0.2]), 0.1,
                          "lora-r4-s2-top1")]
    evaluations = {"/runs/fomaml": (0.727, 0.608), "/runs/hyper": (0.767, 0.608),
                   "/runs/fortunes": (0.556, 0.611)}
    # two runs of the task's family: the one whose own held-out evaluation is better
    choice, why, _ = choose_by_similarity(np.array([1.0, 0.25, 0.2]), centroids, evaluations)
    assert choice == Choice("/runs/hyper", "meta")
    assert "meta-learned init 76.7%" in why and "the best of the 2 runs near" in why
    # near a run whose meta-learned init lost to the standard init on its own tasks
    choice, why, _ = choose_by_similarity(np.array([0.2, 1.05, 0.2]), centroids, evaluations)
    assert choice == Choice("/runs/fortunes", "standard", "lora-r4-s2-top1")
    assert why.endswith("standard init 61.1%: the standard init")
    # without evaluations: the nearest run near
    assert choose_by_similarity(np.array([0.2, 1.05, 0.2]), centroids)[0] == Choice(
        "/runs/fortunes", "meta")


def test_run_evaluation_reads_the_nearest_evaluated_shot_count(tmp_path):
    from metapeft_dist.rundir import run_evaluation

    def summary(meta, random):
        return {"inits": {"meta": {"mean": [0.2, meta]}, "random": {"mean": [0.2, random]}}}

    (tmp_path / "results.json").write_text(json.dumps({"evaluation": {"shots": {
        "1": summary(0.5, 0.4), "5": summary(0.7, 0.6)}}}))
    assert run_evaluation(tmp_path, 1) == (0.5, 0.4)
    assert run_evaluation(tmp_path, 4) == (0.7, 0.6)
    assert run_evaluation(tmp_path, 3) == (0.5, 0.4)  # a tie goes to the fewer shots
    assert run_evaluation(tmp_path / "none", 5) is None


def test_configurations_name_each_peft_configuration_once():
    def spec(model):
        return parse_spec(f"family: {{name: wordnet}}\nalgorithm: {{name: fomaml}}\n"
                          f"model: {model}\n")

    top1 = spec("{kind: encoder, train: lora, lora: {rank: 4, alpha: 8, layers: 1}}")
    top2 = spec("{kind: encoder, train: lora, lora: {rank: 8, alpha: 8, layers: 2, "
                "targets: [query, key, value]}}")
    assert peft_name(top1.model) == "lora-r4-s2-top1"
    assert peft_name(top2.model) == "lora-r8-s1-top2-query+key+value"
    digits = parse_spec("family: {name: digits}\nalgorithm: {name: fomaml}\n")
    assert peft_name(digits.model) == "all"
    choices = configurations({"/r/a": top1, "/r/b": top1, "/r/c": top2})
    assert sorted(choices) == ["head", "meta:a", "meta:b", "meta:c", "standard:lora-r4-s2-top1",
                               "standard:lora-r8-s1-top2-query+key+value"]
    assert choices["standard:lora-r4-s2-top1"].run_dir == "/r/a"  # the first run that has it
    assert choices["standard:lora-r8-s1-top2-query+key+value"] == Choice("/r/c", "standard",
                                                                         "lora-r8-s1-top2-query+key+value")


def test_tasks_of_runs_with_other_lora_layers_are_embedded_through_one_top_layer():
    from metapeft_dist.rundir import AdaptError
    from metapeft_dist.task_embedding import probe_model

    def spec(model):
        return parse_spec(f"family: {{name: wordnet}}\nalgorithm: {{name: fomaml}}\n"
                          f"model: {model}\n")

    one = spec("{kind: encoder, train: lora, lora: {rank: 4, layers: 1}}")
    three = spec("{kind: encoder, train: lora, lora: {rank: 8, layers: 3}}")
    assert probe_model([three, one]).lora.layers == 1
    shorter = spec("{kind: encoder, train: lora, max_len: 16, lora: {rank: 4, layers: 1}}")
    with pytest.raises(AdaptError, match="must share one encoder"):
        probe_model([one, shorter])


def test_outcome_store_appends_and_names_a_bad_line(tmp_path):
    store = OutcomeStore(tmp_path / "sub" / "outcomes.jsonl")
    assert store.read() == []
    store.append([_outcome("t1", "a", 0.5, [0.1, 0.2])])
    store.append([_outcome("t2", "b", 0.7, [0.3, 0.4])])
    rows = store.read()
    assert [(o.task, o.config, o.accuracy) for o in rows] == [("t1", "a", 0.5), ("t2", "b", 0.7)]
    np.testing.assert_allclose(rows[1].embedding, [0.3, 0.4])
    assert store.read(kind="handcrafted") == []
    with open(store.path, "a") as f:
        f.write('{"task": "t3"}\n')
    before = store.path.read_text()
    with pytest.raises(SelectionError, match=r"outcomes.jsonl:3: not an outcome record"):
        store.read()
    assert store.path.read_text() == before  # nothing lost


def test_outcome_records_are_compact_and_the_store_keeps_the_newest(tmp_path):
    """A record of a Task2Vec embedding of MiniLM's top layer (8,448 numbers) takes ~45 KB
    as base64 float32 (45,056 characters for the embedding) instead of ~168 KB as JSON
    decimals; past ``max_records`` the oldest records are dropped, so the file stays
    bounded."""
    vector = np.random.default_rng(0).lognormal(size=8448).astype(np.float32)
    store = OutcomeStore(tmp_path / "outcomes.jsonl", max_records=3)
    store.append([_outcome("t0", "a", 0.5, vector)])
    size = store.path.stat().st_size
    assert 45_056 < size < 45_500, size
    np.testing.assert_array_equal(store.read()[0].embedding, vector)  # exact round trip
    for i in range(1, 5):
        store.append([_outcome(f"t{i}", "a", 0.5, vector)])
    assert [o.task for o in store.read()] == ["t2", "t3", "t4"]
    assert store.path.stat().st_size < 3 * 45_500
    # a record as written before (the embedding as a JSON list) still reads
    with open(store.path, "a") as f:
        f.write(json.dumps({"task": "old", "config": "b", "accuracy": 0.25, "kind": "task2vec",
                            "probe": "p", "shots": 5, "steps": 10,
                            "embedding": [0.5, 0.25]}) + "\n")
    old = store.read()[-1]
    assert old.task == "old" and old.embedding.tolist() == [0.5, 0.25]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder_run")
    return _run(root, "{kind: encoder, train: lora, max_len: 16, lora: {rank: 2, layers: 1}}")


@pytest.fixture(scope="module")
def hyper_run(tmp_path_factory):
    # another LoRA configuration than encoder_run's: rank 4 on the top two layers
    return _run(tmp_path_factory.mktemp("hyper_run"),
                "{kind: encoder, train: lora, max_len: 16, lora: {rank: 4, layers: 2}}",
                "{name: hyper, meta_batch: 2, iterations: 4, "
                "hyper: {task_dim: 8, hidden: 16, map_rank: 2}}", name="hyper")


def test_adapt_hyper_generates_the_start(tmp_path, encoder_run, hyper_run):
    task = _write_task(tmp_path / "task.jsonl", ("food", "sport"), slice(0, 3))
    held = _write_task(tmp_path / "held.jsonl", ("food", "sport"), slice(3, 6))
    out = _cli("adapt", "--init", "hyper", "--candidate", str(encoder_run), "--candidate",
               str(hyper_run), "--data", str(task), "--holdout", str(held), "--steps", "0",
               "--out", str(tmp_path / "adapter"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["generated"] is True and report["selection"]["method"] == "hyper"
    assert report["run_dir"] == str(hyper_run)
    # With no step the adapter is the generated start, and its prototype head already
    # classifies the support set it was built from.
    assert report["holdout_accuracy"][0] == report["holdout_accuracy"][1]
    assert report["support_accuracy"][0] >= 0.5
    none = _cli("adapt", "--init", "hyper", "--candidate", str(encoder_run), "--data",
                str(task))
    assert none.returncode == 2 and "exactly one hypernetwork run" in none.stderr


def test_embed_a_task_file(tmp_path, encoder_run):
    task = _write_task(tmp_path / "task.jsonl", ("food", "sport"))
    out = _cli("embed", "--data", str(task), "--init", str(encoder_run), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # Task2Vec of MiniLM's top layer: one number per output unit of its 16 weights
    assert result["dim"] == len(result["embedding"]) == 8448
    assert result["labels"] == ["food", "sport"] and result["examples"] == 12
    assert min(result["embedding"]) >= 0 and ":16:5" in result["probe"]
    hand = _cli("embed", "--data", str(task), "--init", str(encoder_run), "--kind",
                "handcrafted", "--out", str(tmp_path / "e.json"))
    assert hand.returncode == 0 and "18 numbers" in hand.stdout
    assert len(json.loads((tmp_path / "e.json").read_text())["embedding"]) == 18
    # where the embedding cannot go: one line, and a folder is refused before any work
    unwritable = [(tmp_path, f"--out {tmp_path} is a directory; give a file to write the "
                             "embedding to")]
    if os.path.exists("/dev/full"):  # Linux: every write to it fails as on a full disk
        os.symlink("/dev/full", tmp_path / "full.json")
        unwritable.append((tmp_path / "full.json",
                           f"cannot write {tmp_path / 'full.json'}: No space left on device"))
    for out, phrase in unwritable:
        bad = _cli("embed", "--data", str(task), "--init", str(encoder_run), "--kind",
                   "handcrafted", "--out", str(out))
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and lines == [f"error: {phrase}"], bad.stderr


def test_fit_and_use_the_learned_embedding(tmp_path, encoder_run):
    net = tmp_path / "learned.safetensors"
    fit = _cli("embed", "--fit", str(net), "--family", "wordnet", "--steps", "20", "--json")
    assert fit.returncode == 0, fit.stderr
    result = json.loads(fit.stdout)
    assert result["families"] == ["wordnet"] and result["dim"] == 32
    assert result["loss"][1] < result["loss"][0]  # InfoNCE from log(32) = 3.47 down
    task = _write_task(tmp_path / "task.jsonl", ("food", "sport"))
    out = _cli("embed", "--data", str(task), "--kind", "learned", "--learned", str(net),
               "--json")
    assert out.returncode == 0, out.stderr
    vector = np.array(json.loads(out.stdout)["embedding"])
    assert vector.shape == (32,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    # The run's encoder reads 16 tokens, not 32: other features, so the network refuses.
    other = _cli("embed", "--data", str(task), "--init", str(encoder_run), "--kind",
                 "learned", "--learned", str(net))
    assert other.returncode == 2 and "trained on the features of" in other.stderr
    both = _cli("embed", "--data", str(task), "--fit", str(net))
    assert both.returncode == 2 and "or --fit FILE" in both.stderr
    folder = _cli("embed", "--fit", str(tmp_path), "--family", "wordnet", "--steps", "20")
    assert folder.returncode == 2 and folder.stderr.strip().splitlines()[-1] == (
        f"error: cannot save the learned embedding as {tmp_path}: it is a directory")


def test_adapt_auto_chooses_and_says_why(tmp_path, encoder_run, hyper_run):
    task = _write_task(tmp_path / "task.jsonl", ("food", "sport"), slice(0, 3))
    held = _write_task(tmp_path / "held.jsonl", ("food", "sport"), slice(3, 6))
    outcomes = tmp_path / "outcomes.jsonl"
    args = ["adapt", "--init", "auto", "--candidate", str(encoder_run), "--candidate",
            str(hyper_run), "--data", str(task), "--holdout", str(held), "--steps", "3",
            "--outcomes", str(outcomes), "--out", str(tmp_path / "adapter"), "--json"]
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    selection = json.loads(out.stdout)["selection"]
    assert selection["method"] == "similarity" and "radius" in selection["why"]
    # Both runs' centroids, through one probe (MiniLM's top layer at 16 tokens), though
    # the runs adapt one and two layers.
    saved = {}
    for run in (encoder_run, hyper_run):
        saved[run] = json.loads((run / "task-embedding-task2vec-3shot.json").read_text())
        assert saved[run]["probe"].endswith(":16:5")
    # The configuration the set-up makes best, from what the runs saved: among the runs
    # whose radius holds the task, the best own evaluation at 3 shots (its meta-learned
    # init, or its standard init where that evaluated better); near none, the standard
    # init of the nearest run's configuration.
    from metapeft_dist.rundir import run_evaluation

    peft = {encoder_run: "standard:lora-r2-s4-top1", hyper_run: "standard:lora-r4-s2-top2"}
    dists = {run: selection["detail"][str(run)] for run in saved}
    near = [run for run in saved if dists[run] <= saved[run]["radius"]]
    evaluations = {run: run_evaluation(run, 3) for run in saved}
    assert all(e is not None for e in evaluations.values())  # both runs evaluated
    if near:
        best = max(near, key=lambda run: evaluations[run][0])
        meta, standard = evaluations[best]
        expected = peft[best] if meta < standard else f"meta:{best.name}"
    else:
        expected = peft[min(saved, key=dists.get)]
    assert selection["chosen"] == expected, (selection, dists, saved)
    recorded = OutcomeStore(outcomes).read()
    assert len(recorded) == 1 and recorded[0].config == selection["chosen"]

    # Enough recorded outcomes near this task that say the standard init of rank 4 on
    # two layers adapts it best: the predictor follows them, so it chooses the LoRA
    # rank and layers, and adapts with the run that has that configuration.
    vector = recorded[0].embedding
    rng = np.random.default_rng(0)
    OutcomeStore(outcomes).append(
        Outcome(f"past{i}", config, acc, vector * rng.uniform(0.9, 1.1, vector.shape),
                "task2vec", recorded[0].probe, 6, 3)
        for i in range(20)
        for config, acc in (("head", 0.7), ("standard:lora-r2-s4-top1", 0.6),
                            ("standard:lora-r4-s2-top2", 0.9), ("meta:run", 0.5),
                            ("meta:hyper", 0.8)))
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["selection"]["method"] == "outcomes"
    assert report["selection"]["chosen"] == "standard:lora-r4-s2-top2"
    assert report["start_from"] == "standard" and report["run_dir"] == str(hyper_run)
    assert report["generated"] is False and "recorded tasks" in report["selection"]["why"]
    # the adapter written has the chosen configuration: rank 4 on layers 4 and 5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["layers"] == [4, 5] and config["lora_parameters"]["rank"] == 4
    text = _cli(*args[:-1])  # (the outcomes now hold this task itself, at distance 0)
    assert text.returncode == 0
    assert re.match(r"chose \S+ by outcomes: predicted from the 7 nearest of 21 recorded",
                    text.stdout), text.stdout

    with open(outcomes, "a") as f:
        f.write("not json\n")
    bad_cases = [
        (args[:-1], "outcomes.jsonl:104: not an outcome record"),
        (["adapt", "--init", "auto", "--candidate", str(encoder_run), "--candidate",
          str(encoder_run), "--data", str(task)], "given twice"),
        (["adapt", "--init", "auto", "--data", str(task)], "needs candidate runs"),
        (["adapt", "--init", str(encoder_run), "--candidate", str(encoder_run), "--data",
          str(task)], "--candidate goes with --init auto or --init hyper"),
        (["embed", "--data", str(tmp_path / "none.jsonl")], "task file not found"),
        (["embed", "--data", str(task), "--kind", "learned"], "needs its trained network"),
    ]
    for bad, phrase in bad_cases:
        result = _cli(*bad)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (bad, result.stderr)
        assert phrase in lines[0], (bad, lines)
