"""Bad data through the CLI (issue 22, items 2 and 3): ``python -m concept_ext run`` on a folder dataset with
an empty split, too few rows, a bad label, too few class names, an empty text or a single class ends with a
one-paragraph ``DataError`` naming the file, before any model is loaded, without a traceback, exit 1."""
from __future__ import annotations

import numpy as np
import pytest
from cli import SHARED, run_cli, tiny_config, write_split

from concept_ext.text import data as D

pytestmark = pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared not present")

GOOD_TEXTS = [f"sentence number {i} about {'sports' if i % 2 else 'markets'}" for i in range(12)]
GOOD_LABELS = [i % 2 for i in range(12)]


def _dataset(tmp_path, train=None, test=None):
    folder = tmp_path / "mydata"
    write_split(folder, "train", *(train or (GOOD_TEXTS, GOOD_LABELS)))
    write_split(folder, "test", *(test or (GOOD_TEXTS, GOOD_LABELS)))
    return folder


BAD = {
    # name: (train texts, train labels, class_names, fragments the message must hold)
    "empty_split": ([], [], ["neg", "pos"], ["train.csv", "no rows"]),
    "fewer_rows_than_classes": (["only one"], [1], ["neg", "pos"], ["train.csv", "1 row(s)", "fewer than its 2"]),
    "label_outside": (GOOD_TEXTS, GOOD_LABELS[:-1] + [-3], ["neg", "pos"], ["train.csv", "row 11", "label -3"]),
    "class_names_short": (GOOD_TEXTS, GOOD_LABELS[:-1] + [2], ["neg", "pos"],
                          ["train.csv", "row 11", "class_names has 2 name"]),
    "nan_text": (GOOD_TEXTS[:3] + [None] + GOOD_TEXTS[4:], GOOD_LABELS, ["neg", "pos"],
                 ["train.csv", "row 3", "empty or missing text"]),
    "empty_text": (GOOD_TEXTS[:5] + ["   "] + GOOD_TEXTS[6:], GOOD_LABELS, ["neg", "pos"],
                   ["train.csv", "row 5", "empty or missing text"]),
    "one_class": (GOOD_TEXTS, [0] * 12, ["neg", "pos"], ["train.csv", "has label 0 (neg)", "at least two classes"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_paragraph_before_any_model(tmp_path, case):
    texts, labels, names, fragments = BAD[case]
    folder = _dataset(tmp_path, train=(texts, labels))
    cfg = tiny_config(tmp_path, dataset=str(folder), class_names=names, train_rows=None, test_rows=None)
    res = run_cli(["run", "--config", cfg, "--out", tmp_path / "out", "--quiet"])
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    err = res.stderr.strip().splitlines()
    first = next(i for i, line in enumerate(err) if line.startswith("error (DataError): "))
    message = err[first]
    for frag in fragments:
        assert frag in message, f"{frag!r} not in {message!r}"
    assert len(err) == first + 2 and err[-1].strip(), "one paragraph, then what to do"
    assert "loaded backbone" not in res.stderr, "the data must be checked before any model is loaded"
    assert not (tmp_path / "out" / "finetune" / "model").exists()


def test_test_split_with_one_class_warns_and_runs(tmp_path):
    folder = _dataset(tmp_path, test=(GOOD_TEXTS, [1] * 12))
    cfg = tiny_config(tmp_path, dataset=str(folder), class_names=["neg", "pos"], train_rows=None, test_rows=None,
                      finetune={"steps": 2, "batch_size": 4, "lr": 1e-3})
    res = run_cli(["finetune", "--config", cfg, "--out", tmp_path / "out", "--quiet"])
    assert res.returncode == 0, res.stderr
    assert "every test row has label 1 (pos)" in res.stderr and "test.csv" in res.stderr


def test_registry_class_names_shorter_than_labels_is_refused():
    """class_names given for a registry dataset must still cover its labels (AG News has 4 classes)."""
    with pytest.raises(D.DataError, match="class_names has 2 name"):
        D.load_dataset("ag_news", "test", class_names=["a", "b"], max_rows=50)


def test_check_splits_warns_on_missing_classes():
    mk = lambda labels, split: D.TextDataset([f"t{i}" for i in range(len(labels))], np.asarray(labels),  # noqa: E731
                                             ["a", "b", "c"], "k", split, "fp")
    assert D.check_splits(mk([0, 1, 2], "train"), mk([0, 1, 2], "test")) == []
    warns = D.check_splits(mk([0, 1, 1], "train"), mk([0, 1, 2], "test"))
    assert len(warns) == 1 and "no row of class(es) ['c']" in warns[0]
