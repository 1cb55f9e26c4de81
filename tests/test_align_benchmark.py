"""benchmarks/align_detectors.py: its CFP folds are the official splits, its ORL / Yale pairs are
cross_dataset's, its helpers do what they say."""

from pathlib import Path

import numpy as np
import pytest

from benchmarks import align_detectors as bench
from facefuse.align.detect import make_face
from facefuse.core.paths import shared_data_dir

DATA = shared_data_dir()


@pytest.fixture(scope="module")
def protocols():
    needed = [DATA / "lfw" / "pairs.txt", DATA / "lfw" / "raw-fold0", DATA / "cfp" / "pairs_FP.txt", DATA / "orl"]
    if not all(p.exists() for p in needed):
        pytest.skip(f"shared data not found at {DATA} (set FACEFUSE_DATA)")
    sets = bench.photo_sets(DATA)
    return sets, bench.pair_protocols(DATA, sets, seed=0)


@pytest.mark.parametrize("name,images", [("FF", ("F", "F")), ("FP", ("F", "P"))])
def test_cfp_folds_are_the_official_splits(protocols, name, images):
    """Against Protocol/Split/<name>/NN/same.txt and diff.txt and the numbered image lists."""
    root = DATA / "cfp" / "Protocol"
    lists = {k: dict(line.split() for line in (root / f"image_list_{k}.txt").read_text().splitlines() if line.strip())
             for k in ("F", "P")}
    paths, ia, ib, labels, folds = protocols[1][f"cfp-{name}"]
    got = {(str(paths[a]), str(paths[b]), int(y), int(f)) for a, b, y, f in zip(ia, ib, labels, folds)}
    want = set()
    for s in range(10):
        for kind, label in (("same", 1), ("diff", 0)):
            for line in (root / "Split" / name / f"{s + 1:02d}" / f"{kind}.txt").read_text().split():
                i, j = line.split(",")
                a, b = lists[images[0]][i], lists[images[1]][j]
                want.add((str(DATA / "cfp" / a), str(DATA / "cfp" / b), label, s))
    assert got == want and len(want) == 7000


def test_lfw_fold0_and_cross_dataset_pairs(protocols):
    sets, proto = protocols
    ia, ib, labels, folds = proto["lfw-fold0"]
    assert ia.size == 600 and labels.sum() == 300 and folds is None
    raw = sets["raw-fold0"]
    same = [raw[a].parent.name == raw[b].parent.name for a, b in zip(ia, ib)]
    np.testing.assert_array_equal(same, labels == 1)
    ia, ib, labels, _ = proto["orl"]
    orl = sets["orl"]
    assert labels.sum() == 40 * 45 and labels.size == 2 * 40 * 45  # every genuine pair, as many impostors
    np.testing.assert_array_equal([orl[a].parent.name == orl[b].parent.name for a, b in zip(ia, ib)], labels == 1)


def test_sample_and_off_centre():
    paths = [Path(f"{k}.jpg") for k in range(100)]
    assert bench.sample(paths, 5) == [paths[0], paths[24], paths[49], paths[74], paths[99]]
    assert bench.sample(paths[:3], 5) == paths[:3]
    centred = make_face((75, 75, 175, 175), 1.0, np.arange(10.0).reshape(5, 2), "mtcnn")
    aside = make_face((0, 0, 100, 100), 1.0, np.arange(10.0).reshape(5, 2), "mtcnn")
    assert not bench.off_centre(centred, 250) and bench.off_centre(aside, 250)
