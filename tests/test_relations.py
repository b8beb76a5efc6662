"""--label-relations: which relations the training labels support, which NA entries they decide, and that the
decided entries reach the training loss only (validation, thresholds and the label counts keep the given labels)."""

import json

import numpy as np
import pytest
from accelerate import Accelerator

from attrclf import engine
from attrclf.config import parse_args
from attrclf.errors import AttrclfError
from attrclf.labels import label_counts
from attrclf.relations import Relation, apply_relations, complete_training_labels, label_matrix, mine_relations

from .conftest import tiny_config

NA = np.nan


def structured_labels(n=40):
    """Columns: flag (every 4th image), smile (every 4th image from the second, never with flag), face (present
    wherever smile is, and on every 8th image from the third), other (every 3rd image: with and without each of
    the others)."""
    rows = []
    for i in range(n):
        flag, smile = float(i % 4 == 0), float(i % 4 == 1)
        face = float(smile == 1 or i % 8 == 2)
        rows.append([flag, smile, face, float(i % 3 == 0)])
    return np.array(rows)


def test_relations_with_no_counter_example_and_enough_evidence_are_found():
    labels = structured_labels()
    found = {(r.premise, r.conclusion, r.implies): r.support for r in mine_relations(labels, min_evidence=3)}
    # flag excludes smile and face (10 flags; smile's share 0.25, face's 0.375: 2.5 and 3.75 expected counter-
    # examples were they unrelated): only face passes the evidence floor of 3 as a conclusion of flag
    assert (0, 2, False) in found and (0, 1, False) not in found
    # smile implies face (10 smiles, face absent on 62.5% of images: 6.25 expected counter-examples) and excludes
    # flag (10 x 0.25 = 2.5 < 3: not enough)
    assert found[(1, 2, True)] == 10 and (1, 0, False) not in found
    # 'other' has counter-examples both ways with every attribute
    assert not any(3 in key[:2] for key in found)
    # with a lower floor, flag excludes smile too
    assert (0, 1, False) in {(r.premise, r.conclusion, r.implies) for r in mine_relations(labels, min_evidence=2)}


def test_relations_count_known_pairs_only_and_need_ten_premise_positives():
    labels = structured_labels()
    labels[1::4, 2] = NA  # face unknown on every smile image: "smile implies face" has no known pair left
    assert (1, 2, True) not in {(r.premise, r.conclusion, r.implies) for r in mine_relations(labels, 1)}
    few = structured_labels(36)  # 9 smiles: below the 10 positives a premise needs
    assert not [r for r in mine_relations(few, 0.5) if r.premise == 1]
    with pytest.raises(AttrclfError, match="--relation-evidence must be > 0"):
        mine_relations(labels, 0)


def test_relations_decide_na_entries_from_given_labels_both_ways_without_chains_or_conflicts():
    labels = np.array([
        [1, NA, NA],   # a present: b absent (a excludes b); c present (a implies c)
        [NA, 1, NA],   # b present: a absent (contrapositive of the exclusion); c stays NA (no chain through a)
        [NA, NA, 0],   # c absent: a absent (contrapositive of the implication)
        [NA, 1, 0],    # a absent twice over; b, c given
        [0, NA, NA],   # a absent decides nothing
    ])
    relations = [Relation(0, 1, False, 10), Relation(0, 2, True, 10)]
    filled = apply_relations(labels, relations)
    expected = np.array([[1, 0, 1], [0, 1, NA], [0, NA, 0], [0, 1, 0], [0, NA, NA]])
    np.testing.assert_array_equal(filled, expected)
    np.testing.assert_array_equal(labels[0], [1, NA, NA])  # the input is left as it was
    # two relations that decide an entry differently leave it NA
    conflict = apply_relations(np.array([[1.0, 1.0, NA]]), [Relation(0, 2, True, 10), Relation(1, 2, False, 10)])
    assert np.isnan(conflict[0, 2])


def test_completed_labels_change_the_training_split_only(tiny_data):
    from .conftest import tiny_split

    data = tiny_split(tiny_data)
    given = label_matrix(data.train["labels"], 3)
    completed, report = complete_training_labels(data, min_evidence=0.5)
    assert completed.validation is data.validation and completed.label_names == data.label_names
    new = label_matrix(completed.train["labels"], 3)
    known = ~np.isnan(given)
    np.testing.assert_array_equal(new[known], given[known])  # every given label kept
    assert report["filled_total"] == int((np.isnan(given) & ~np.isnan(new)).sum())
    assert report["given_known"] == int(known.sum())
    assert sum(v["present"] + v["absent"] for v in report["filled"].values()) == report["filled_total"]


def relation_dataset(labels_factory):
    """90 images; 'flag' and 'smile' never together; 'smile' NA on half the flag images, 'flag' NA on 6 smiles."""
    lines = ["img flag smile other"]
    for i in range(90):
        flag, smile = int(i % 3 == 0), int(i % 3 == 1)
        smile_text = "NA" if flag and i % 2 else str(smile)
        flag_text = "NA" if smile and i % 5 == 1 else str(flag)
        lines.append(f"i{i:02d}.png {flag_text} {smile_text} {i % 2}")
    return labels_factory(lines)


def test_training_with_label_relations_fills_the_loss_labels_and_reports_the_given_ones(
        tmp_path, labels_factory, monkeypatch):
    root = relation_dataset(labels_factory)
    seen = {}
    real_fit = engine.fit

    def spy(model, data, cfg, accelerator, **kwargs):
        seen["train"] = data.train["labels"]
        return real_fit(model, data, cfg, accelerator, **kwargs)

    monkeypatch.setattr(engine, "fit", spy)
    cfg = tiny_config(root, tmp_path / "out", group_column=None, label_relations=True, relation_evidence=2,
                      epochs=1, keep_checkpoints=0)
    data = engine.load_training_data(cfg, Accelerator(cpu=True))
    metrics = engine.train_and_save(cfg, data, Accelerator(cpu=True))
    report = metrics["label_relations"]
    # the split decides which direction has the support; either decides smile on a flag image (contrapositive)
    assert any(f"'{a}' excludes '{b}'" in text for text in report["relations"] for a, b in
               (("flag", "smile"), ("smile", "flag")))
    given, loss_labels = label_matrix(data.train["labels"], 3), label_matrix(seen["train"], 3)
    flags = given[:, 0] == 1
    assert np.isnan(given[flags, 1]).any() and (loss_labels[flags, 1] == 0).all()  # smile decided absent
    assert report["filled"]["smile"]["absent"] == int(np.isnan(given[flags, 1]).sum())
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["label_relations"] == report
    # the counts in metrics.json and everything validation gives are the given labels
    assert saved["data"]["train_counts"] == label_counts(data.train["labels"], 3).by_attribute(data.label_names)
    assert saved["data"]["validation_counts"] == label_counts(data.validation["labels"], 3).by_attribute(
        data.label_names)


def test_label_relations_flags_are_checked():
    assert parse_args(["--relation-evidence", "2"]).unused_flags() == [
        "--relation-evidence 2 is unused: it tunes --label-relations, which this run does not use"]
    assert parse_args(["--label-relations", "--relation-evidence", "2"]).unused_flags() == []
    with pytest.raises(AttrclfError, match="--relation-evidence must be > 0"):
        parse_args(["--data", "d", "--relation-evidence", "0"]).resolve()
    with pytest.raises(AttrclfError, match="--label-relations reads every training label"):
        parse_args(["--data", "shards/*.tar", "--label-relations", "--max-steps", "5"]).resolve()


def test_the_card_names_the_relations_and_the_entries_they_decided():
    from attrclf.card import relations_note

    assert relations_note({}) == "" and relations_note(None) == ""
    report = {"min_evidence": 3.0, "relations": ["'flag' excludes 'smile' (14 images)"], "given_known": 100,
              "filled": {"flag": {"present": 0, "absent": 0}, "smile": {"present": 0, "absent": 9}},
              "filled_total": 9}
    note = relations_note({"label_relations": report})
    assert "1 relation(s) held on every training image where both attributes were known" in note
    assert "('flag' excludes 'smile' (14 images))" in note and "decided 9 NA training entries" in note
    assert "(smile 0 present / 9 absent)" in note and "flag 0 present" not in note
    assert "no NA entry was filled" in relations_note({"label_relations": {**report, "relations": []}})
