"""Pseudo-sources: k-means on last-block hidden states for data without source labels."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
import yaml
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from colm.cli import main
from colm.data import DataError, MixtureSpec, build_default_mixture, pseudo_sources
from colm.data.pseudo_sources import (
    PseudoSources,
    _normalise,
    cluster_embeddings,
    embed_examples,
)
from colm.features.locate import find_layers
from tests.conftest import make_rows, make_tiny


def _blobs(sizes=(30, 20, 12), dim=16, spread=0.05, seed=0) -> tuple[np.ndarray, list[int]]:
    """Well-separated Gaussian groups with their true labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    truth = [g for g, n in enumerate(sizes) for _ in range(n)]
    return x, truth


def test_kmeans_matches_sklearn_on_fixed_data():
    x, _ = _blobs(spread=1.5, seed=3)  # overlapping groups: the partition is not trivial
    ours = cluster_embeddings(x, k=3, seed=7)
    ref = KMeans(n_clusters=3, n_init=10, random_state=7).fit_predict(_normalise(x))
    assert adjusted_rand_score(ours.labels, ref) == 1.0  # same partition up to renaming
    assert ours.k == 3 and sum(ours.sizes.values()) == len(x)
    assert list(ours.sizes.values()) == sorted(ours.sizes.values(), reverse=True)


def test_deterministic_for_a_seed():
    x, _ = _blobs(spread=2.0, seed=1)
    a = cluster_embeddings(x, k=None, seed=5)
    b = cluster_embeddings(x, k=None, seed=5)
    assert a.as_dict() == b.as_dict()


@pytest.mark.parametrize("auto", ["density", "silhouette"])
def test_automatic_k_recovers_separated_groups(auto):
    x, truth = _blobs(sizes=(25, 18, 10, 7))
    res = cluster_embeddings(x, k=None, seed=0, auto=auto)
    assert res.k == 4 and res.method == auto
    assert adjusted_rand_score(truth, res.labels) == 1.0
    if auto == "silhouette":
        assert set(res.silhouettes) == set(range(2, 11))
        assert max(res.silhouettes, key=res.silhouettes.get) == 4
    else:
        assert res.silhouettes == {} and res.min_cluster_size == 60 // 8  # small data
    # the typical example of each cluster belongs to it
    for name, i in res.typical.items():
        assert res.labels[i] == name
    assert PseudoSources.from_dict(res.as_dict()) == res


def _big_spread_and_small_tight(seed: int, dim: int = 32) -> tuple[np.ndarray, list[int]]:
    """Two big sources spread wide and three small tight ones: the imbalance CoLM is for."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim)) * 4
    groups = [(400, 1.5), (300, 1.5), (20, 0.3), (20, 0.3), (20, 0.3)]
    x = np.concatenate([c + s * rng.normal(size=(n, dim)) for c, (n, s) in zip(centres, groups)])
    return x, [g for g, (n, _) in enumerate(groups) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1])
def test_density_keeps_small_sources_apart_where_the_silhouette_merges_them(seed):
    """Why density is the default: k-means with the silhouette's k (2 here) merges the
    small groups into the big ones; the density clustering finds all five groups."""
    x, truth = _big_spread_and_small_tight(seed)
    merged = cluster_embeddings(x, k=None, seed=0, auto="silhouette")
    assert merged.k == 2 and adjusted_rand_score(truth, merged.labels) < 0.9
    res = cluster_embeddings(x, k=None, seed=0)
    assert res.k == 5 and adjusted_rand_score(truth, res.labels) == 1.0
    assert sorted(res.sizes.values()) == [20, 20, 20, 300, 400]


def test_density_on_a_sample_labels_every_example(monkeypatch):
    """Above DENSITY_SAMPLE examples the density clustering is fitted on a sample; every
    other example joins the nearest centroid, which on separated groups is its own. (A
    group needs about min_cluster_size examples IN the sample to be found.)"""
    ps = sys.modules["colm.data.pseudo_sources"]

    x, truth = _blobs(sizes=(300, 200, 60, 40), seed=4)
    monkeypatch.setattr(ps, "DENSITY_SAMPLE", 300)
    res = cluster_embeddings(x, k=None, seed=3)
    assert len(res.labels) == len(x) and res.k == 4
    assert adjusted_rand_score(truth, res.labels) == 1.0


def test_density_splits_no_further_than_max_clusters(monkeypatch):
    """Too many dense groups: min_cluster_size doubles until at most MAX_DENSITY_CLUSTERS
    clusters remain."""
    ps = sys.modules["colm.data.pseudo_sources"]

    x, _ = _blobs(sizes=(40,) * 8, spread=0.05, seed=2)
    assert cluster_embeddings(x, k=None).k == 8
    monkeypatch.setattr(ps, "MAX_DENSITY_CLUSTERS", 4)
    res = cluster_embeddings(x, k=None)
    assert res.k <= 4 and res.min_cluster_size > 15


def test_bad_auto():
    with pytest.raises(ValueError, match="auto='kmeans' is invalid"):
        cluster_embeddings(np.eye(4), auto="kmeans")


def test_embeddings_are_the_last_block_input_mean():
    model = make_tiny("llama")
    rows = make_rows(n=7, max_len=12, seed=2)
    emb = embed_examples(model, rows, batch_size=3, progress=False)
    _, layers = find_layers(model)
    seen = []
    hook = layers[-1].register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            for i, r in enumerate(rows):  # one unpadded example at a time
                model(input_ids=torch.tensor([r["input_ids"]]))
                ref = seen[-1][0].double().mean(0).numpy()
                np.testing.assert_allclose(emb[i], ref, rtol=1e-4, atol=1e-5)
    finally:
        hook.remove()


def test_pseudo_sources_on_a_model_with_lora():
    model = make_tiny("llama", lora=True)
    rows = make_rows(n=12, max_len=10, seed=4)
    res = pseudo_sources(model, rows, k=3, seed=0, batch_size=5, progress=False)
    assert res.k == 3 and len(res.labels) == 12
    assert set(res.labels) == {"cluster_0", "cluster_1", "cluster_2"}
    again = pseudo_sources(model, rows, k=3, seed=0, batch_size=2, progress=False)
    assert again.labels == res.labels  # batching does not change the result


# -- bad input ---------------------------------------------------------------------------


def test_k_larger_than_the_data():
    model = make_tiny("llama")
    rows = make_rows(n=4, seed=0)
    with pytest.raises(DataError, match=r"data\.num_sources.*larger than the data \(4 examples"):
        pseudo_sources(model, rows, k=5, progress=False)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_k_invalid(k):
    x, _ = _blobs()
    with pytest.raises(ValueError, match=r"data\.num_sources"):
        cluster_embeddings(x, k=k)


def test_fewer_distinct_examples_than_clusters():
    x = np.repeat(np.eye(3), 4, axis=0)  # 12 examples, 3 distinct
    with pytest.raises(DataError, match=r"only 3 of the 12 examples are distinct"):
        cluster_embeddings(x, k=4)
    assert cluster_embeddings(x, k=None).k == 3  # each group of duplicates: dense
    assert cluster_embeddings(x, k=None, auto="silhouette").k == 3  # silhouette 1


def test_duplicate_only_data_gives_one_cluster_with_a_note():
    model = make_tiny("llama")
    row = make_rows(n=1, seed=0)[0]
    with pytest.warns(UserWarning, match="duplicates only"):
        res = pseudo_sources(model, [dict(row) for _ in range(6)], progress=False)
    assert res.k == 1 and set(res.labels) == {"cluster_0"} and "duplicates" in res.note
    with pytest.raises(DataError, match=r"data\.num_sources.*only 1 of the 6"):
        pseudo_sources(model, [dict(row) for _ in range(6)], k=2, progress=False)


def test_empty_examples_are_refused():
    model = make_tiny("llama")
    rows = make_rows(n=3, seed=0)
    with pytest.raises(DataError, match="no examples"):
        pseudo_sources(model, [], progress=False)
    empty = {"input_ids": [], "attention_mask": [], "labels": []}
    with pytest.raises(DataError, match="example 1 has no tokens"):
        pseudo_sources(model, [rows[0], empty, rows[2]], progress=False)
    masked = dict(rows[0], attention_mask=[0] * len(rows[0]["input_ids"]))
    with pytest.raises(DataError, match="example 0 has no tokens"):
        pseudo_sources(model, [masked, rows[1]], progress=False)
    with pytest.raises(DataError, match="no 'input_ids'"):
        pseudo_sources(model, [{"prompt": "x"}], progress=False)


def test_too_few_examples_for_automatic_k():
    with pytest.raises(DataError, match=r"at least 3 examples.*data\.num_sources"):
        cluster_embeddings(np.eye(2), k=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cluster_embeddings(np.eye(2), k=2).k == 2


# -- colm train on data without a source column ------------------------------------------

SOURCES = {"basic_arithmetic": 30, "chain_sum": 30, "gcd": 30, "lcm": 30}


def unlabelled_file(tmp_path) -> tuple[object, list[str]]:
    """A small built-in mixture (SOURCES) written as JSONL without its source column;
    returns the file and the hidden true sources, in file order."""
    mix = build_default_mixture(
        MixtureSpec.from_dict(
            {"train": SOURCES, "test_per_source": 2, "ood": {"products": 2}, "seed": 0}
        )
    )
    data = tmp_path / "unlabelled.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
            for r in mix.train
        )
    )
    return data, [r["source"] for r in mix.train]


def _unlabelled_run(tmp_path, model_dir) -> tuple[object, list[str]]:
    """A config training on unlabelled_file; returns the config path and the hidden true
    sources, in file order."""
    data, truth = unlabelled_file(tmp_path)
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"path": str(data), "max_length": 96},
        "train": {"steps": 2, "source_batch": 8, "micro_batches": 2, "save_steps": 2},
        "eval": {"enabled": False},
    }
    path = tmp_path / "unlabelled.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, truth


def test_colm_train_without_source_column_recovers_the_sources(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """No source column: a notice, pseudo-sources (k chosen automatically) written to the
    run directory, the clusters flow through selection as sources, they recover the
    hidden true sources far above chance, and --resume restores them without a model pass."""
    cfg, truth = _unlabelled_run(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "has no 'source' column: using pseudo-sources" in err
    run = tmp_path / "run"
    saved = json.loads((run / "pseudo_sources.json").read_text())
    assert (run / "pseudo_sources_embeddings.npy").exists()
    labels = saved["labels"]
    assert len(labels) == len(truth) and saved["k"] == len(set(labels))
    assert set(saved["first_words"]) == set(saved["sizes"]) and all(saved["first_words"].values())

    ari = adjusted_rand_score(truth, labels)
    rng = np.random.default_rng(0)
    chance = max(adjusted_rand_score(truth, rng.permutation(labels)) for _ in range(200))
    with capsys.disabled():
        print(f"pseudo-sources k={saved['k']} ARI={ari:.3f} (random assignment: <= {chance:.3f})")
    assert chance < 0.1  # what a random assignment of the same cluster sizes reaches
    assert ari >= 0.6, (ari, saved["silhouettes"])

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k.split("/")[1] for x in lines for k in x if k.endswith("/in_batch")}
    assert logged and logged <= set(labels)  # clusters are the selector's sources

    from colm.report import make_report

    text = make_report([run], tmp_path / "report").read_text()
    assert "## Pseudo-sources" in text and f"k={saved['k']}" in text
    assert saved["method"] == "density" and "found by density, min_cluster_size" in text
    assert saved["first_words"]["cluster_0"] in text  # what each cluster is

    import sys

    module = sys.modules["colm.data.pseudo_sources"]

    def no_model_pass(*a, **k):
        raise AssertionError("resume recomputed the embeddings")

    monkeypatch.setattr(module, "embed_examples", no_model_pass)
    assert main(["train", "--resume", str(run), "train.steps=3"]) == 0
    assert "pseudo-sources restored" in capsys.readouterr().err
    assert json.loads((run / "pseudo_sources.json").read_text()) == saved
    steps = [x["step"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert 3 in steps


def test_config_keys_are_checked(tmp_path, tiny_model_dir, capsys):
    cfg, _ = _unlabelled_run(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), "data.sources=clusters"]) == 2
    assert "data.sources='clusters' is invalid" in capsys.readouterr().err
    assert main(["train", str(cfg), "data.num_sources=0"]) == 2
    assert "data.num_sources=0 is invalid" in capsys.readouterr().err
    assert main(["train", str(cfg), "data.sources=auto", "data.num_sources=500"]) == 2
    assert "data.num_sources" in capsys.readouterr().err


def test_runs_share_the_embeddings_cache(tmp_path, tiny_model_dir, embed_counts, capsys):
    """data.embeddings_cache: the second run on the same data and model embeds only the
    spot-check examples, and clusters the same; a cache that does not match the model
    is redone, with a notice; a file where the folder should be is a config error."""
    cfg, _ = _unlabelled_run(tmp_path, tiny_model_dir)
    cache = tmp_path / "embeddings"
    sizes = embed_counts

    def run(name: str) -> dict:
        args = ["train", str(cfg), f"output_dir={tmp_path / name}", "train.steps=1"]
        assert main([*args, f"data.embeddings_cache={cache}", "data.num_sources=3"]) == 0
        return json.loads((tmp_path / name / "pseudo_sources.json").read_text())

    first = run("a")
    n = sum(SOURCES.values())
    assert sizes == [n]
    (file,) = cache.glob("pseudo_sources_*.npy")
    np.testing.assert_array_equal(
        np.load(file), np.load(tmp_path / "a" / "pseudo_sources_embeddings.npy")
    )
    sizes.clear()
    assert run("b")["labels"] == first["labels"]
    assert sizes == [2]  # the spot check only
    assert "reusing the shared embeddings" in capsys.readouterr().err

    planted = np.random.default_rng(0).normal(size=np.load(file).shape)  # another model's
    np.save(file, planted)
    sizes.clear()
    assert run("c")["labels"] == first["labels"]
    assert sizes == [2, n]
    assert "does not match this model's embeddings" in capsys.readouterr().err
    assert not np.array_equal(np.load(file), planted)  # redone for the next run

    (tmp_path / "not_a_folder").write_text("x")
    args = ["train", str(cfg), f"data.embeddings_cache={tmp_path / 'not_a_folder'}"]
    assert main(args) == 2
    assert "data.embeddings_cache=" in capsys.readouterr().err


@pytest.mark.parametrize("as_dataset", [False, True])
def test_trainer_without_source_column(tmp_path, as_dataset):
    """CoLMTrainer(source_column=None) clusters its training set and selects by cluster."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from colm import SelectorConfig
    from colm.integrations.hf_trainer import CoLMTrainer
    from tests.conftest import collate_rows

    rows = make_rows(n=16, max_len=10, seed=3)
    data = Dataset.from_list(rows) if as_dataset else rows
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_drop_last=True,
    )
    trainer = CoLMTrainer(
        model=make_tiny("llama", lora=True),
        args=args,
        train_dataset=data,
        data_collator=collate_rows,
        colm_config=SelectorConfig(ratio=0.5, check_replay=False),
        source_column=None,
        colm_num_sources=3,
    )
    res = trainer.colm_pseudo_sources
    assert res.k == 3
    assert [r["source"] for r in trainer.train_dataset] == res.labels
    assert trainer.colm_source_counts == res.sizes
    trainer.train()
    assert trainer.state.global_step == 1


def test_builtin_mixture_with_sources_auto(tmp_path, tiny_model_dir):
    """data.sources=auto on labelled data: the labels are replaced by k clusters
    (data.num_sources) and the agreement with them is recorded."""
    cfg, _ = _unlabelled_run(tmp_path, tiny_model_dir)
    args = ["train", str(cfg), "data.path=null", "data.sources=auto", "data.num_sources=4"]
    mixture = f"data.mixture={{train: {SOURCES}, test_per_source: 1, ood: {{products: 1}}}}"
    assert main([*args, mixture, "train.steps=1"]) == 0
    saved = json.loads((tmp_path / "run" / "pseudo_sources.json").read_text())
    assert saved["k"] == 4 and saved["silhouettes"] == {}
    assert saved["ari_vs_labels"] >= 0.6


@pytest.mark.slow
def test_smollm2_pseudo_sources_recover_the_mixture(tmp_path):
    """The packaged SmolLM2-135M on 4 sources x 30 examples, labels hidden: k is chosen
    automatically and the clusters match the sources (measured: k=4, ARI 0.98 by density,
    1.0 by silhouette; random assignment <= 0.05). About 4 min on 2 shared CPU cores, most of it embedding."""
    sources = "{basic_arithmetic: 30, chain_sum: 30, gsm_symbolic: 30, simple_equations: 30}"
    code = main(
        [
            "train",
            "configs/default.yaml",
            f"output_dir={tmp_path / 'run'}",
            "data.sources=auto",
            "train.steps=1",
            "train.source_batch=8",
            "data.max_length=128",  # half the embedding time of 256; long gsm ones are cut
            "eval.enabled=false",
            "eval.at_start=false",
            f"data.mixture={{train: {sources}, test_per_source: 1, ood: {{products: 1}}}}",
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "run" / "pseudo_sources.json").read_text())
    assert saved["k"] == 4 and saved["ari_vs_labels"] >= 0.9
