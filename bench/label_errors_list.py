"""Build bench/data/cifar10_test_label_errors.csv: the CIFAR-10 test images a human study checked,
mapped onto the test split of an ImageFolder copy of CIFAR-10.

Usage: python bench/label_errors_list.py STUDY_DIR [--data DATA] [--out CSV]
STUDY_DIR: a copy of https://github.com/cleanlab/label-errors (Northcutt, Athalye & Mueller, 2021,
"Pervasive Label Errors in Test Sets Destabilize Machine Learning Benchmarks"), from which this reads
mturk/cifar10_mturk.json (five Mechanical Turk votes on each of the 275 test images the study's
model flagged) and original_test_labels/cifar10_test_set_original_labels.npy (the 10,000 test
labels in the original order, the order of the votes' `id`). DATA: the ImageFolder copy (a folder or
.tar.gz with test/<class>/<file>; default $CIFARKIT_DATA) whose files keep the original order within
each class folder, as cifar10-jpeg.tar.gz does.

The mapping: original index i -> its class c = labels[i] and its rank r among the test images of
class c in the original order (how many images of class c come before it) -> the r-th file, sorted
by name, of the copy's folder test/<name of c>/ -> that file's position in the copy's test split
(files sorted by path, as cifarkit's reader orders them).

Confirmed label error, as the study defines it: fewer than 3 of the 5 workers chose the given label
alone (mturk.given < 3; a vote for "both" does not confirm the given label). On CIFAR-10 this gives
the study's 54; the 18 among them where 3 or more workers chose the study's suggestion are its
"correctable" ones.
"""
import argparse
import csv
import json
import os
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
COLUMNS = ("study_index", "our_index", "our_file", "given_label", "study_suggestion", "votes_given",
           "votes_suggestion", "votes_neither", "votes_both", "confirmed")


def test_files(data: Path) -> list[str]:
    """The copy's test files as test/<class>/<file>, sorted by path (the reader's order)."""
    if data.is_dir():
        names = [p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()]
    else:
        with tarfile.open(data) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
    tests = []
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] == "test":
            tests.append("/".join(parts[-3:]))
    return sorted(tests)


def build(study: Path, data: Path) -> list[dict]:
    votes = json.loads((study / "mturk" / "cifar10_mturk.json").read_text())
    labels = np.load(study / "original_test_labels" / "cifar10_test_set_original_labels.npy").astype(np.int64)
    files = test_files(data)
    position = {f: i for i, f in enumerate(files)}
    by_class = {c: sorted(f for f in files if f.split("/")[1] == c) for c in CLASSES}
    # checks: the copy has each class's images in the number the original has, and the votes'
    # given labels are the original labels at their index
    counts = np.bincount(labels, minlength=len(CLASSES))
    assert len(files) == len(labels), f"the copy has {len(files)} test images, the study {len(labels)}"
    assert [len(by_class[c]) for c in CLASSES] == counts.tolist(), "class sizes differ from the original's"
    rank = np.zeros(len(labels), dtype=np.int64)                   # rank within its class, original order
    for c in range(len(CLASSES)):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    rows = []
    for v in sorted(votes, key=lambda v: v["id"]):
        i, g = v["id"], v["given_original_label"]
        assert labels[i] == g and CLASSES[g] == v["given_original_label_name"], v
        f = by_class[CLASSES[g]][rank[i]]
        m = v["mturk"]
        assert sum(m.values()) == 5, v
        rows.append({"study_index": i, "our_index": position[f], "our_file": f, "given_label": CLASSES[g],
                     "study_suggestion": v["our_guessed_label_name"], "votes_given": m["given"],
                     "votes_suggestion": m["guessed"], "votes_neither": m["neither"], "votes_both": m["both"],
                     "confirmed": int(m["given"] < 3)})
    return rows


def check_with_model(study: Path, data: Path, run: str) -> None:
    """The mapping against a trained run: on the test images the study's own model got wrong
    (cross_validated_predicted_probabilities/cifar10_test_set_pyx.npy), how often the run predicts
    the same wrong class, under the mapping and under one shuffled within each class."""
    from cifarkit.data.sources import load_arrays
    from cifarkit.weights import load
    labels = np.load(study / "original_test_labels" / "cifar10_test_set_original_labels.npy").astype(np.int64)
    theirs = np.load(study / "cross_validated_predicted_probabilities" / "cifar10_test_set_pyx.npy").argmax(1)
    ours = load(run).probabilities(load_arrays(str(data)).test_x).numpy().argmax(1)
    order = np.zeros(len(labels), dtype=np.int64)                # original index -> position in the copy
    shuffled = np.zeros_like(order)
    rng = np.random.default_rng(0)
    for c in range(len(CLASSES)):
        members = np.flatnonzero(labels == c)
        order[members] = (labels < c).sum() + np.arange(len(members))             # the folders sorted by class
        shuffled[members] = rng.permutation(order[members])
    wrong = theirs != labels
    for name, where in (("the mapping", order), ("shuffled within each class", shuffled)):
        print(f"{name}: same wrong class on {(ours[where[wrong]] == theirs[wrong]).mean():.1%} of the "
              f"{wrong.sum()} test images the study's model got wrong")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path)
    p.add_argument("--data", type=Path, default=os.environ.get("CIFARKIT_DATA"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "cifar10_test_label_errors.csv")
    p.add_argument("--check", metavar="RUN", help="also check the mapping against this run's predictions "
                                                  "(needs the study's cross_validated_predicted_probabilities/)")
    args = p.parse_args()
    if args.data is None:
        p.error("give --data (the ImageFolder copy) or set CIFARKIT_DATA")
    rows = build(args.study, args.data)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    confirmed = sum(r["confirmed"] for r in rows)
    correctable = sum(r["confirmed"] and r["votes_suggestion"] >= 3 for r in rows)
    print(f"{len(rows)} images the study's workers checked, {confirmed} confirmed label errors "
          f"({correctable} correctable) -> {args.out}")
    if args.check:
        check_with_model(args.study, args.data, args.check)


if __name__ == "__main__":
    main()
