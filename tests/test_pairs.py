"""core.pairs: every supported format, path resolution and one error per kind of bad line."""

from pathlib import Path

import numpy as np
import pytest

from facefuse.core.pairs import read_pairs
from facefuse.core.errors import FacefuseError


def _write(tmp_path, text, name="pairs.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _lfw_text(n_folds, per_side):
    lines = [f"{n_folds}\t{per_side}"] if n_folds > 1 else [f"{per_side}"]
    for f in range(n_folds):
        lines += [f"P{f}_{k}\t{k + 1}\t{k + 3}" for k in range(per_side)]
        lines += [f"P{f}_{k}\t{k + 1}\tQ{f}_{k}\t{k + 2}" for k in range(per_side)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("n_folds,per_side", [(10, 3), (3, 7), (2, 1)])
def test_lfw_view2(tmp_path, n_folds, per_side):
    p = read_pairs(_write(tmp_path, _lfw_text(n_folds, per_side)), root=tmp_path / "imgs")
    n = 2 * n_folds * per_side
    assert p.format == "lfw" and len(p) == n
    np.testing.assert_array_equal(p.folds, np.repeat(np.arange(n_folds), 2 * per_side))
    np.testing.assert_array_equal(p.labels, np.tile(np.r_[np.ones(per_side), np.zeros(per_side)], n_folds))
    np.testing.assert_array_equal(p.lines, np.arange(2, n + 2))
    assert p.paths_a[0] == tmp_path / "imgs" / "P0_0" / "P0_0_0001.jpg"
    assert p.paths_b[0] == tmp_path / "imgs" / "P0_0" / "P0_0_0003.jpg"
    assert p.paths_b[per_side] == tmp_path / "imgs" / "Q0_0" / "Q0_0_0002.jpg"


def test_byte_order_mark_is_not_part_of_the_first_path(tmp_path):
    """A pairs file saved by an editor that writes a UTF-8 BOM parses like the same file without it."""
    plain = read_pairs(_write(tmp_path, "a/x.jpg b/y.jpg 1\nc/z.jpg d/w.jpg 0\n"), root=tmp_path)
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbf" + "a/x.jpg b/y.jpg 1\nc/z.jpg d/w.jpg 0\n".encode())
    bom = read_pairs(p, root=tmp_path)
    assert bom.paths_a == plain.paths_a == [tmp_path / "a" / "x.jpg", tmp_path / "c" / "z.jpg"]
    lfw = tmp_path / "lfw.txt"
    lfw.write_bytes(b"\xef\xbb\xbf" + _lfw_text(10, 3).encode())
    assert read_pairs(lfw, root=tmp_path).format == "lfw"


def test_lfw_dev_single_fold_default_root(tmp_path):
    p = read_pairs(_write(tmp_path, _lfw_text(1, 5), "pairsDevTest.txt"))
    assert p.format == "lfw-dev" and len(p) == 10
    assert set(p.folds.tolist()) == {0}
    assert p.paths_a[0].parent.parent == tmp_path  # the pairs file's folder


@pytest.mark.parametrize("sep", [" ", "\t", ",", "  "])
@pytest.mark.parametrize("labels", [None, ("1", "0", "1"), ("same", "different", "Same")])
def test_plain(tmp_path, sep, labels):
    rows = [("a.jpg", "b.jpg"), ("sub/c.png", "/abs/d.jpg"), ("e.jpg", "a.jpg")]
    text = "# comment\n\n" + "\n".join(
        sep.join(r + ((labels[i],) if labels else ())) for i, r in enumerate(rows)) + "\n"
    p = read_pairs(_write(tmp_path, text, "p.csv"), root=tmp_path / "r")
    assert p.format == "plain" and len(p) == 3 and p.folds is None
    assert p.paths_a[1] == tmp_path / "r" / "sub" / "c.png"
    assert p.paths_b[1] == Path("/abs/d.jpg")
    np.testing.assert_array_equal(p.lines, [3, 4, 5])
    if labels:
        np.testing.assert_array_equal(p.labels, [1, 0, 1])
    else:
        assert p.labels is None
    uniq, ia, ib = p.unique_paths()
    assert len(uniq) == 5 and ia[2] != ib[2] and ib[2] == ia[0]
    assert [uniq[i] for i in ia] == p.paths_a and [uniq[i] for i in ib] == p.paths_b


def test_tab_separated_paths_may_hold_spaces(tmp_path):
    p = read_pairs(_write(tmp_path, "my a.jpg\tmy b.jpg\t1\n"))
    assert p.paths_a[0].name == "my a.jpg"


@pytest.mark.parametrize("text,msg", [
    ("10\t300\nA\t1\t2\n", r"pairs.txt: header says 10 fold\(s\) x 2 x 300 = 6000 pairs, found 1 lines"),
    ("1\t1\nA\t1\t2\t3\t4\nB\t1\tC\t1\n", r"pairs.txt:2: expected 3 or 4 fields, got 5"),
    ("1\t1\nA\t1\tC\t1\nB\t1\t2\n", r"pairs.txt:2: expected a same-person .* got 4 fields"),
    ("1\t1\nA\t1\t2\nB\t1\t2\n", r"pairs.txt:3: expected a different-person .* got 3 fields"),
    ("1\t1\nA\tx\t2\nB\t1\tC\t1\n", r"pairs.txt:2: image number 'x'"),
    ("1\t1\nA\t0\t2\nB\t1\tC\t1\n", r"pairs.txt:2: image number '0'"),
    ("a.jpg b.jpg\nc.jpg\n", r"pairs.txt:2: expected `path_a path_b \[label\]` \(2 or 3 fields\), got 1"),
    ("a.jpg b.jpg 1\n\nc.jpg d.jpg 1 x\n", r"pairs.txt:3: .* got 4"),
    ("a.jpg,,1\n", r"pairs.txt:1: .*got an empty field"),
    ("a.jpg b.jpg 1\nc.jpg d.jpg\n", r"pairs.txt:2: no label here but line 1 has one"),
    ("a.jpg b.jpg\nc.jpg d.jpg 0\n", r"pairs.txt:2: a label here but line 1 has none"),
    ("a.jpg b.jpg maybe\n", r"pairs.txt:1: label 'maybe' is not 1/0 or same/different"),
    ("\n# only a comment\n", r"no pairs"),
])
def test_bad_lines_name_file_and_line(tmp_path, text, msg):
    with pytest.raises(FacefuseError, match=msg):
        read_pairs(_write(tmp_path, text))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(FacefuseError, match="not found"):
        read_pairs(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(FacefuseError, match="not a text file"):
        read_pairs(tmp_path / "bin.txt")


def test_real_lfw_files(lfw):
    p = read_pairs(lfw / "pairs.txt", root=lfw / "lfw-112")
    assert p.format == "lfw" and len(p) == 6000 and p.labels.sum() == 3000
    assert np.bincount(p.folds).tolist() == [600] * 10
    assert all(x.is_file() for x in p.paths_a[:50] + p.paths_b[-50:])
    uniq, _, _ = p.unique_paths()
    assert 7000 < len(uniq) < 8000
    for name, n in (("pairsDevTrain.txt", 2200), ("pairsDevTest.txt", 1000)):
        d = read_pairs(lfw / name, root=lfw / "lfw-112")
        assert d.format == "lfw-dev" and len(d) == n and d.labels.sum() == n // 2
