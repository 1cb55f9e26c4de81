"""`--center` (verify, calibrate): embeddings centred on their set's mean before cosine, checked
against the textbook formula computed pair by pair, and its bad inputs."""

import json
import math

import numpy as np
import pytest

from helpers import assert_one_line_error, make_model_file, run_cli, write_identities

from facefuse.core.errors import FacefuseError
from facefuse.core.vectors import CENTER_MIN_ROWS, center_rows
from facefuse.export.runtime import TorchEmbedder


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def _centred_cosine(rows, i, j):
    """cos(a_i - m, a_j - m) with a = rows / |rows| and m their mean, in plain Python floats."""
    unit = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in rows]
    m = [sum(col) / len(unit) for col in zip(*unit)]
    a, b = ([u - c for u, c in zip(unit[k], m)] for k in (i, j))
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_center_rows_is_the_cosine_of_the_deviations_from_the_mean():
    rng = np.random.default_rng(0)
    # a strong component every row shares (one camera, grey) plus a per-row part
    rows = 3.0 * rng.normal(size=8) + rng.normal(size=(60, 8))
    out = center_rows(rows)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    for i, j in [(0, 1), (5, 40), (17, 59), (3, 3)]:
        assert float(out[i] @ out[j]) == pytest.approx(_centred_cosine(rows.tolist(), i, j), abs=1e-5)
    plain = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert (plain @ plain.T).mean() > 0.7 and abs((out @ out.T).mean()) < 0.05  # the shared part is gone


def test_center_rows_takes_the_mean_over_ok_rows_only():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(CENTER_MIN_ROWS + 3, 5)).astype(np.float32)
    ok = np.ones(len(rows), bool)
    ok[[0, 7]] = False
    rows[7] = np.nan  # a skipped image's row
    out = center_rows(rows, ok)
    kept = rows[ok].tolist()
    assert float(out[ok][1] @ out[ok][4]) == pytest.approx(_centred_cosine(kept, 1, 4), abs=1e-5)
    assert np.isnan(out[7]).all()
    np.testing.assert_allclose(out[0], rows[0] / np.linalg.norm(rows[0]), rtol=1e-6)


def test_center_rows_needs_a_set():
    with pytest.raises(FacefuseError, match=f"pairs.txt: 49 images embedded; centring needs at least {CENTER_MIN_ROWS}"):
        center_rows(np.ones((49, 4)), where="pairs.txt")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("center")
    model = make_model_file(root / "model.pt")
    names = [f"id{k:02d}" for k in range(20)]
    return root, model, write_identities(root / "set", names, 3, size=64)


def _hand_scores(model, paths, pairs):
    emb, _ = TorchEmbedder(model, device="cpu").embed_paths(paths, workers=0)
    rows = emb.astype(np.float64).tolist()
    return np.array([_centred_cosine(rows, paths.index(a), paths.index(b)) for a, b in pairs])


def test_verify_and_calibrate_center_match_the_formula_and_record_it(faces, tmp_path):
    import shutil

    root, model, by_id = faces
    paths = [p for ps in by_id.values() for p in ps]
    rng = np.random.default_rng(2)
    genuine = [(ps[0], ps[k]) for ps in by_id.values() for k in (1, 2)]
    impostor = [tuple(paths[k] for k in rng.choice(len(paths), 2, replace=False)) for _ in range(200)]
    impostor = [(a, b) for a, b in impostor if a.parent != b.parent]
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("".join(f"{a} {b} {int(a.parent == b.parent)}\n" for a, b in genuine + impostor))
    used = sorted({p for ab in genuine + impostor for p in ab})  # the images the mean is taken over
    assert len(used) >= CENTER_MIN_ROWS

    out = tmp_path / "scores.csv"
    r = run_cli("verify", pairs_file, "--model", model, "--center", "--out", out, "--workers", 0, "--json")
    assert r.exit_code == 0, r.output
    got = np.loadtxt(out, delimiter=",", skiprows=1, usecols=3)
    np.testing.assert_allclose(got, _hand_scores(model, used, genuine + impostor), atol=1e-5)

    # calibrate on the same pairs with --center: the threshold thresholds the hand-centred scores
    own = tmp_path / "own.pt"
    shutil.copy(model, own)
    r = run_cli("calibrate", pairs_file, "--model", own, "--far", 0.1, "--center", "--json", "--workers", 0)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["provenance"]["settings"]["center"] is True
    hand = _hand_scores(model, used, impostor)
    (entry,) = rec["at_far"]
    top, k = np.sort(hand)[::-1], int(0.1 * hand.size)  # at most k impostors may reach the threshold
    assert top[k] - 1e-5 < entry["threshold"] <= top[k - 1] + 1e-5
    text = run_cli("calibrate", pairs_file, "--model", own, "--far", 0.1, "--center", "--dry-run", "--workers", 0)
    assert text.exit_code == 0 and "calibrated on pairs.txt (flip off, align none, centred):" in text.stdout
    plain = json.loads(run_cli("verify", pairs_file, "--model", own, "--json", "--workers", 0).stdout)
    assert "calibrated with flip off, align none, centred; this run uses flip off, align none:" in plain["note"]
    centred = json.loads(run_cli("verify", pairs_file, "--model", own, "--json", "--workers", 0, "--center").stdout)
    assert "note" not in centred and centred["threshold"] == pytest.approx(entry["threshold"])


def test_center_on_too_few_images_is_one_line_error(faces, tmp_path):
    root, model, by_id = faces
    a, b = by_id["id00"][:2]
    pairs_file = tmp_path / "two.txt"
    pairs_file.write_text(f"{a} {b} 1\n")
    assert_one_line_error(run_cli("verify", pairs_file, "--model", model, "--center", "--workers", 0),
                          "--center: two.txt: 2 images embedded; centring needs at least 50")
    small = write_identities(tmp_path / "small", ["ann", "bob", "cid"], 3, size=64)
    assert sum(map(len, small.values())) == 9
    assert_one_line_error(run_cli("calibrate", tmp_path / "small", "--model", model, "--center", "--dry-run",
                                  "--workers", 0, "--impostors", 10),
                          "--center: small: 9 images embedded; centring needs at least 50")
