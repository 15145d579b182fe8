"""Class tags: a real (tiny, random-weight) ViT classifier loaded by path, tags in the catalog, label filters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.classifier import Classifier, ClassifierConfig
from indexer.errors import WeightsUnavailable
from indexer.faissio import reconstruct_all
from indexer.runner import IndexConfig, index_folder
from indexer.snapshot import Snapshot
from indexer.testing import save_random_classifier
from search import Engine, UnknownLabel

LABELS = ["cat", "dog", "boat", "tree", "lamp", "plane"]
CFG = IndexConfig(workers=0, progress=False)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    d = save_random_classifier(tmp_path_factory.mktemp("clf") / "vit", LABELS)
    return Classifier(ClassifierConfig(model=str(d)), device=torch.device("cpu"))


def tags(idx) -> dict[int, list[tuple[str, float]]]:
    out: dict[int, list] = {}
    for i, lab, p in Snapshot.open(idx).catalog().execute("SELECT photo_id, label, prob FROM labels ORDER BY photo_id, rank"):
        out.setdefault(i, []).append((lab, p))
    return out


def test_top5_are_the_models_own_probabilities(classifier):
    px = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    out = classifier.classify(px)
    assert [len(t) for t in out] == [5, 5]
    x = (torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        probs = classifier.model(pixel_values=x).logits.softmax(-1)
    for b in range(2):
        best = probs[b].argsort(descending=True)[:5]
        assert [lab for lab, _ in out[b]] == [LABELS[i] for i in best.tolist()]
        assert np.allclose([p for _, p in out[b]], probs[b][best].numpy(), atol=1e-5)
    # another input size is resized to the classifier's own
    assert len(classifier.classify(px[:, :112, :112])[0]) == 5


def test_index_tags_every_photo_and_filters_searches(photos, embedder, classifier, tmp_path):
    idx = tmp_path / "idx"
    stats = index_folder(photos, idx, embedder, CFG, classifier=classifier)
    assert stats.indexed == stats.labelled == 48
    t = tags(idx)
    assert len(t) == 48 and all(len(v) == 5 for v in t.values())
    engine = Engine(idx, embedder=embedder)
    label = engine.label_counts()[0][0]
    with_label = engine.photos_with_label(label)
    assert with_label == {i for i, v in t.items() if label in [lab for lab, _ in v]}
    hits = engine.similar(1, k=48, label=label)
    assert {h.photo_id for h in hits} == with_label
    assert {h.photo_id for h in engine.region(1, k=48, box=(0, 0, 50, 50), label=label.upper())} <= with_label
    with pytest.raises(UnknownLabel, match=f"no photo is tagged 'no such tag'; tags near it: .*{label}"):
        engine.similar(1, k=5, label="no such tag")  # never a silent empty answer: the common tags are offered
    with pytest.raises(UnknownLabel, match=f"tags near it: {label}"):
        engine.similar(1, k=5, label=label[:-1] + "x")  # a typo: the tag it was meant to be
    assert Snapshot.open(idx).manifest.classifier == classifier.config.model


def test_tags_added_later_without_re_embedding(photos, embedder, classifier, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    ids0, before = reconstruct_all(Snapshot.open(idx).global_index())
    stats = index_folder(photos, idx, embedder, CFG, classifier=classifier)
    assert stats.indexed == 0 and stats.labelled == 48 and stats.touched == 0
    ids1, after = reconstruct_all(Snapshot.open(idx).global_index())
    assert np.array_equal(ids0, ids1) and np.array_equal(before, after)
    assert len(tags(idx)) == 48
    # a changed photo gets new tags, a deleted one loses them, nothing else is tagged again
    files = sorted(photos.rglob("*.jpg"))
    Image.open(files[5]).rotate(90, expand=True).save(files[1])
    files[2].unlink()
    stats = index_folder(photos, idx, embedder, CFG, classifier=classifier)
    assert stats.indexed == 1 and stats.labelled == 1
    assert len(tags(idx)) == 47


def test_cli_classify_info_and_label_filter(photos, tiny_model, tmp_path):
    clf = save_random_classifier(tmp_path / "vit", LABELS)
    idx = tmp_path / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args, cwd=None):
        return subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, env=env, timeout=600,
                              cwd=cwd)

    # a classifier directory given relative to where the user stands is recorded absolute (like the backbone)
    p = run("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "--classifier", "vit", "-q", cwd=tmp_path)
    assert p.returncode == 0 and "48 indexed, 48 tagged" in p.stdout, p.stderr
    q = str(sorted(photos.rglob("*.jpg"))[0])
    out = json.loads(run("classify", str(idx), q, "--json").stdout)
    assert len(out) == 5 and {o["label"] for o in out} <= set(LABELS)
    info = json.loads(run("info", str(idx), "--json").stdout)
    assert info["classifier"] == str(clf) and sum(info["tags"].values()) == 48
    top = next(iter(info["tags"]))
    hits = json.loads(run("search", str(idx), q, "--label", top, "-k", "48", "--json").stdout)
    assert 0 < len(hits) <= 48
    p = run("index", str(photos), "--index", str(tmp_path / "idx2"), "--model", str(tiny_model), "--classify", "-q")
    assert p.returncode == 2 and "google/vit-base-patch16-224" in p.stderr and "--classifier DIR" in p.stderr


def test_offline_classifier_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="google/vit-base-patch16-224.*--classifier DIR"):
        Classifier(ClassifierConfig(), device=torch.device("cpu"))
