"""`facefuse verify` end to end through the CLI, checked against an independent computation, and
each kind of bad input: exit code 2 and one `error: ...` line."""

import csv
import json

import numpy as np
import pytest

from helpers import assert_one_line_error, make_model_file, run_cli, write_identities
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from facefuse.cli import main
from facefuse.export.runtime import TorchEmbedder
from facefuse.core import metrics


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield




def make_identities(root, n_ids, per_id, seed=0, layout="lfw"):
    names = [f"Person_{chr(65 + i)}" for i in range(n_ids)]
    return write_identities(root, names, per_id, seed=seed, size=72, layout="lfw" if layout == "lfw" else "flat-png")



run = run_cli



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model = make_model_file(root / "model.pt")
    ids = make_identities(root / "imgs", 5, 3)
    names = list(ids)
    same = [(ids[n][a], ids[n][b]) for n in names for a, b in ((0, 1), (1, 2))]
    diff = [(ids[names[i]][0], ids[names[(i + k) % 5]][2]) for i in range(5) for k in (1, 2)]
    return root, model, ids, same, diff


def _independent_scores(model, pa, pb):
    emb = TorchEmbedder(model, device="cpu")
    ea, _ = emb.embed_paths(pa, workers=0)
    eb, _ = emb.embed_paths(pb, workers=0)
    return np.sum(ea.astype(np.float64) * eb, 1)


def test_plain_labelled_pairs(data):
    root, model, ids, same, diff = data
    rows = [(a, b, 1) for a, b in same] + [(a, b, 0) for a, b in diff]
    pairs = root / "pairs.csv"
    pairs.write_text("\n".join(f"{a.relative_to(root / 'imgs')},{b.relative_to(root / 'imgs')},"
                               f"{'same' if y else 'different'}" for a, b, y in rows) + "\n")
    out = run("verify", pairs, "--model", model, "--root", root / "imgs", "--json",
              "--out", root / "scores.csv", "--plot", root / "roc.png", "--batch-size", 4)
    assert out.exit_code == 0, out.output
    m = json.loads(out.stdout)
    y = np.array([r[2] for r in rows])
    s = _independent_scores(model, [r[0] for r in rows], [r[1] for r in rows])
    assert m["pairs"] == m["scored_pairs"] == 20 and m["images"] == 15 and m["skipped_images"] == 0
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    brute = max(np.mean((s >= t) == y) for t in np.r_[s, s.max() + 1])
    assert m["best_accuracy"] == pytest.approx(brute)
    assert m["eer"] == pytest.approx(metrics.eer(s, y), abs=1e-5)
    assert "kfold_accuracy" not in m
    with open(root / "scores.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["line"]) for r in table] == list(range(1, 21))
    np.testing.assert_allclose([float(r["score"]) for r in table], s, atol=2e-6)
    assert [int(r["label"]) for r in table] == y.tolist()
    assert [int(r["same"]) for r in table] == (s >= m["best_threshold"] - 1e-6).astype(int).tolist()
    assert (root / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lfw_format_folds_and_text_output(data, tmp_path):
    root, model, ids, same, diff = data
    names = list(ids)
    lines = ["2\t2"]
    for f in range(2):
        lines += [f"{names[f]}\t1\t2", f"{names[f + 2]}\t2\t3"]
        lines += [f"{names[f]}\t1\t{names[4]}\t3", f"{names[f + 2]}\t2\t{names[4 - f]}\t1"]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    res = run("verify", pairs, "--model", model, "--root", root / "imgs", "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    from facefuse.core.pairs import read_pairs
    p = read_pairs(pairs, root=root / "imgs")
    s = _independent_scores(model, p.paths_a, p.paths_b)
    mean, std, _, _ = metrics.kfold_accuracy(s, p.labels, p.folds)
    assert m["format"] == "lfw" and m["kfold_n"] == 2
    assert m["kfold_accuracy"] == pytest.approx(mean) and m["kfold_std"] == pytest.approx(std)
    text = run("verify", pairs, "--model", model, "--root", root / "imgs")
    assert text.exit_code == 0 and "kfold_accuracy" in text.stdout and "roc_auc" in text.stdout


def test_unlabelled_with_threshold_and_flip(data, tmp_path):
    root, model, ids, same, diff = data
    rows = same[:3] + diff[:3]
    pairs = tmp_path / "p.txt"
    pairs.write_text("\n".join(f"{a}\t{b}" for a, b in rows) + "\n")  # absolute paths
    s = _independent_scores(model, [a for a, _ in rows], [b for _, b in rows])
    t = float(np.median(s))
    res = run("verify", pairs, "--model", model, "--threshold", t, "--json", "--out", tmp_path / "o.csv")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert "roc_auc" not in m and m["same"] == int(np.sum(s >= t)) and m["same"] + m["different"] == 6
    with open(tmp_path / "o.csv") as f:
        table = list(csv.DictReader(f))
    assert "label" not in table[0] and [int(r["same"]) for r in table] == (s >= t).astype(int).tolist()
    flip = run("verify", pairs, "--model", model, "--flip", "--out", tmp_path / "f.csv")
    assert flip.exit_code == 0, flip.output
    with open(tmp_path / "f.csv") as f:
        fs = np.array([float(r["score"]) for r in csv.DictReader(f)])
    assert np.abs(fs - s).max() > 1e-4  # flip TTA is really applied


def test_onnx_model_gives_the_same_scores(data, tmp_path):
    root, model, ids, same, diff = data
    onnx_path = tmp_path / "m.onnx"
    res = run("export", "--onnx", onnx_path, "--checkpoint", model, "--exporter", "torchscript",
              "--check-images", root / "imgs")
    assert res.exit_code == 0, res.output
    assert "torchscript exporter" in res.stdout and "min cosine" in res.stdout
    pairs = tmp_path / "p.txt"
    pairs.write_text("\n".join(f"{a} {b} 1" for a, b in same) + "\n"
                     + "\n".join(f"{a} {b} 0" for a, b in diff) + "\n")
    a = run("verify", pairs, "--model", model, "--out", tmp_path / "a.csv", "--json")
    b = run("verify", pairs, "--model", onnx_path, "--out", tmp_path / "b.csv", "--json")
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    read = lambda p: np.array([float(r["score"]) for r in csv.DictReader(open(p))])  # noqa: E731
    np.testing.assert_allclose(read(tmp_path / "a.csv"), read(tmp_path / "b.csv"), atol=1e-5)


def test_real_lfw_images(lfw, data, tmp_path):
    from facefuse.core.pairs import read_pairs
    p = read_pairs(lfw / "pairsDevTest.txt", root=lfw / "lfw-112")
    pick = list(range(6)) + list(range(500, 506))
    pairs = tmp_path / "lfw.txt"
    pairs.write_text("".join(f"{p.paths_a[k]}\t{p.paths_b[k]}\t{p.labels[k]}\n" for k in pick))
    res = run("verify", pairs, "--model", data[1], "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    s = _independent_scores(data[1], [p.paths_a[k] for k in pick], [p.paths_b[k] for k in pick])
    assert m["roc_auc"] == pytest.approx(roc_auc_score(p.labels[pick], s), abs=1e-6)


# ---------------------------------------------------------------- bad input


def test_bad_pairs_line(data, tmp_path):
    root, model, *_ = data
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t1\nA\t1\t2\t3\t4\nB\t1\tC\t1\n")
    assert_one_line_error(run("verify", pairs, "--model", model, "--out", tmp_path / "s.csv"),
                          "pairs.txt:2: expected 3 or 4 fields, got 5")
    assert not (tmp_path / "s.csv").exists()


def test_missing_images_are_listed_with_lines_or_skipped(data, tmp_path):
    root, model, ids, same, diff = data
    rows = [f"{a} {b} 1" for a, b in same] + [f"{a} {b} 0" for a, b in diff]
    rows[3] = f"{tmp_path / 'gone.jpg'} {same[3][1]} 1"
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(rows) + "\n")
    res = run("verify", pairs, "--model", model, "--out", tmp_path / "s.csv", "--plot", tmp_path / "r.png")
    assert_one_line_error(res, "1 missing image(s)", "gone.jpg: no such file (pairs.txt:4)", "--skip-missing")
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "r.png").exists()
    ok = run("verify", pairs, "--model", model, "--skip-missing", "--json", "--out", tmp_path / "s.csv")
    assert ok.exit_code == 0, ok.output
    m = json.loads(ok.stdout)
    assert m["skipped_images"] == 1 and m["scored_pairs"] == 19 and m["pairs"] == 20
    table = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert table[3]["score"] == "" and table[4]["score"] != ""


def test_undecodable_image(data, tmp_path):
    root, model, ids, same, diff = data
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is text, not a JPEG")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{same[0][0]} {same[0][1]}\n{bad} {same[1][1]}\n")
    assert_one_line_error(run("verify", pairs, "--model", model), "1 unreadable image(s)", "bad.jpg",
                          "(pairs.txt:2)")


@pytest.mark.parametrize("content,fragment", [(b"plain text, not a model", "not a valid ONNX model"),
                                              (b"PK\x03\x04broken zip", "not a facefuse checkpoint")])
def test_model_that_is_not_one(data, tmp_path, content, fragment):
    root, model, ids, same, diff = data
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{same[0][0]} {same[0][1]}\n")
    assert_one_line_error(run("verify", pairs, "--model", bad), fragment)


def test_option_errors(data, tmp_path):
    root, model, ids, same, diff = data
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{same[0][0]} {same[0][1]}\n")
    assert_one_line_error(run("verify", pairs, "--model", model, "--plot", tmp_path / "r.png"), "--plot needs labels")
    assert_one_line_error(run("verify", pairs, "--model", model, "--plot", tmp_path / "r.xyz"),
                          "unsupported image format 'xyz'")
    assert_one_line_error(run("verify", tmp_path / "none.txt", "--model", model), "pairs file not found")
    assert_one_line_error(run("verify", pairs, "--model", tmp_path / "none.pt"), "no such model")


@pytest.mark.parametrize("kind", ["same", "different"])
def test_one_class_labels_still_score_and_report_the_rate_they_can(data, tmp_path, kind):
    """All-genuine (or all-impostor) labelled pairs: scores, decisions at the threshold, the TAR (or
    FAR) it gives, and a note on why the ROC metrics are absent; --plot (needs ROC) is refused."""
    root, model, ids, same, diff = data
    rows = same if kind == "same" else diff
    pairs = tmp_path / "one.txt"
    pairs.write_text("".join(f"{a} {b} {int(kind == 'same')}\n" for a, b in rows))
    s = _independent_scores(model, [a for a, _ in rows], [b for _, b in rows])
    t = float(np.median(s)) + 1e-4
    res = run("verify", pairs, "--model", model, "--threshold", t, "--json", "--out", tmp_path / "o.csv")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    rate, absent = ("threshold_tar", "threshold_far") if kind == "same" else ("threshold_far", "threshold_tar")
    assert m[rate] == pytest.approx(np.mean(s >= t)) and m[absent] is None
    assert "roc_auc" not in m and "need both kinds" in m["note"] and m["same"] == int(np.sum(s >= t))
    assert [int(r["same"]) for r in csv.DictReader(open(tmp_path / "o.csv"))] == (s >= t).astype(int).tolist()
    bare = run("verify", pairs, "--model", model)
    assert bare.exit_code == 0 and "need both kinds" in bare.stdout and "scores only" in bare.stdout
    assert_one_line_error(run("verify", pairs, "--model", model, "--plot", tmp_path / "r.png"), "both kinds")
    assert not (tmp_path / "r.png").exists()


def test_csv_is_streamed_in_chunks(data, tmp_path, monkeypatch):
    """Scores and CSV rows computed chunk by chunk equal the one-shot computation."""
    from facefuse.verification import scoring as v

    root, model, ids, same, diff = data
    rows = [(a, b, 1) for a, b in same] + [(a, b, 0) for a, b in diff]
    pairs = tmp_path / "p.txt"
    pairs.write_text("".join(f"{a} {b} {y}\n" for a, b, y in rows))
    whole = run("verify", pairs, "--model", model, "--out", tmp_path / "whole.csv", "--threshold", 0.5)
    monkeypatch.setattr(v, "CHUNK", 3)
    chunked = run("verify", pairs, "--model", model, "--out", tmp_path / "chunked.csv", "--threshold", 0.5)
    assert whole.exit_code == chunked.exit_code == 0, whole.output + chunked.output
    assert (tmp_path / "whole.csv").read_bytes() == (tmp_path / "chunked.csv").read_bytes()
    table = list(csv.DictReader(open(tmp_path / "chunked.csv")))
    assert len(table) == 20 and [int(r["label"]) for r in table] == [y for *_, y in rows]
    assert "pairs_per_s" in chunked.stdout


def test_debug_shows_the_exception(data, tmp_path):
    from facefuse.core.errors import FacefuseError
    res = CliRunner().invoke(main, ["--debug", "verify", str(tmp_path / "none.txt"), "--model", str(data[1])])
    assert isinstance(res.exception, FacefuseError)
