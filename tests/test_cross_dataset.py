"""benchmarks/cross_dataset.py's identification measures against a plain loop over the queries."""

import numpy as np

from benchmarks.cross_dataset import identification


def _loop_ranks(emb, ids):
    """Closed set by hand: enrol each multi-image identity's first image, rank every other image."""
    firsts = {}
    for k, i in enumerate(ids.tolist()):
        firsts.setdefault(i, k)
    multi = sorted(i for i in firsts if (ids == i).sum() >= 2)
    ranks = []
    for k, i in enumerate(ids.tolist()):
        if i in multi and k != firsts[i]:
            sims = {j: float(emb[k] @ emb[firsts[j]]) for j in multi}
            ranks.append(sum(s > sims[i] for s in sims.values()))
    return np.array(ranks)


def test_rank1_rank5_and_open_set_match_a_loop():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(12), [3, 1, 4, 2, 2, 5, 1, 2, 3, 2, 2, 1])
    centres = rng.normal(size=(12, 16))
    emb = centres[ids] + rng.normal(scale=1.1, size=(ids.size, 16))  # noisy: some queries miss
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = identification(emb.astype(np.float32), ids, far=0.25)
    ranks = _loop_ranks(emb.astype(np.float32), ids)
    assert out["enrolled"] == 9 and out["queries"] == ranks.size
    assert out["rank1"] == np.mean(ranks == 0) and out["rank5"] == np.mean(ranks < 5)
    assert 0 < out["rank1"] < 1  # the noise makes the test able to fail
    # open set: impostor probes are the odd-positioned multi-image identities and the single-image ones
    # multi-image identities 0 2 3 4 5 7 8 9 10: 0 3 5 8 10 enrolled, every image of the others an impostor
    assert out["open_set_impostor_probes"] == int((~np.isin(ids, [0, 3, 5, 8, 10])).sum())
    assert out["open_set_genuine_probes"] == int(np.isin(ids, [0, 3, 5, 8, 10]).sum()) - 5
    # DIR by hand: impostors' best scores sorted, the (k+1)-th highest is the last one rejected
    e = emb.astype(np.float32)
    enrolled = [0, 3, 5, 8, 10]
    gallery = [int(np.flatnonzero(ids == i)[0]) for i in enrolled]
    top = sorted((max(float(e[k] @ e[g]) for g in gallery) for k in range(ids.size) if ids[k] not in enrolled),
                 reverse=True)
    boundary = top[int(0.25 * len(top))]
    hits = [max(gallery, key=lambda g: float(e[k] @ e[g])) == gallery[enrolled.index(ids[k])]
            and max(float(e[k] @ e[g]) for g in gallery) > boundary
            for k in range(ids.size) if ids[k] in enrolled and k not in gallery]
    assert out["dir_at_far"] == np.mean(hits) and 0 < out["dir_at_far"] < 1
    assert out["open_set_far"] <= 0.25


def test_open_set_needs_enough_impostors():
    ids = np.array([0, 0, 1, 1])
    emb = np.eye(4, dtype=np.float32)
    out = identification(emb, ids, far=0.01)
    assert out["dir_at_far"] is None and out["open_set_impostor_probes"] == 2


def test_levers_table_is_the_join_of_the_committed_cross_dataset_files():
    """Each committed levers row equals its cross_dataset file's figures (nothing copied by hand)."""
    import json

    from benchmarks import levers

    doc = json.loads((levers.RESULTS_DIR / "levers-cpu2.json").read_text())
    protocol = {r["name"]: r for r in json.loads((levers.RESULTS_DIR / "lfw_protocol-cpu2.json").read_text())["results"]}
    assert doc["results"][0]["lever"] == "default (README run)" and len(doc["results"]) >= 5
    for row in doc["results"]:
        source = json.loads((levers.RESULTS_DIR / row["source"]).read_text())
        by_set = {r["set"]: r for r in source["results"]}
        for s in levers.SETS:
            for f in levers.FIGURES:
                assert row[f"{s}:{f}"] == by_set[s][f], (row["lever"], s, f)
        trained = protocol.get(row["lever"].split(" + ")[0])
        assert row["epochs"] == (trained["epochs_done"] if trained else None)
    table = levers.markdown(doc["results"])
    assert table.count("\n") == len(doc["results"]) + 1
