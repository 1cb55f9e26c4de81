"""The gallery folder as a database (index/store.py under index/gallery.py): enrolment and removal
write only what they change, every kind removes (search never returns a removed row; compaction
takes it off the disk), version-1 folders open and upgrade, and, against an independent model (a
plain dict identity -> {path: vector}), a writer killed with SIGKILL at every step of every write
leaves the acknowledged state or the next one and nothing between, also with concurrent writers
killed at random while readers search."""

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

import store_workers as W
from facefuse.core.errors import FacefuseError
from facefuse.index import search as S
from facefuse.index import store
from facefuse.index.gallery import (add_to_gallery, build_gallery, compact_gallery, load_gallery, read_meta,
                                    remove_from_gallery, save_gallery, search_gallery, update_gallery)


def _data(n, d, seed):
    return S.normalize(np.random.default_rng(seed).standard_normal((n, d)))


def _write_v1(folder: Path, x, ids, paths, kind="flat"):
    """A gallery folder as the version-1 code wrote it: meta.json naming index-000002.faiss, the
    previous generation kept, index.faiss a link to the current one."""
    folder.mkdir(parents=True)
    index = S.build_index(x, kind)
    faiss.write_index(index, str(folder / "index-000002.faiss"))
    faiss.write_index(S.build_index(x[:1], kind if kind == "flat" else "flat"), str(folder / "index-000001.faiss"))
    os.symlink("index-000002.faiss", folder / "index.faiss")
    (folder / ".lock").touch()
    meta = {"format": "facefuse-gallery", "kind": kind, "count": len(x), "dim": x.shape[1],
            "model": {"fingerprint": "abc"}, "params": S.resolve_params(kind, len(x), x.shape[1], {}),
            "identities": list(ids), "paths": list(paths), "index_file": "index-000002.faiss", "generation": 2}
    (folder / "meta.json").write_text(json.dumps(meta))


def _state(folder) -> dict:
    """What a flat gallery folder holds: identity -> {path: vector} of its live rows."""
    g = load_gallery(folder)
    x = g.index.reconstruct_n(0, g.index.ntotal)[~g.removed]
    out: dict = {}
    for i, p, v in zip(g.identities, g.paths, x):
        out.setdefault(i, {})[p] = v
    return out


def _same(state: dict, model: dict) -> bool:
    return state.keys() == model.keys() and all(
        state[i].keys() == model[i].keys() and all(np.allclose(state[i][p], model[i][p], atol=1e-6) for p in model[i])
        for i in model)


def _apply(model: dict, op: tuple) -> dict:
    """The model after ``op`` (a copy)."""
    out = {i: dict(rows) for i, rows in model.items()}
    if op[0] == "add":
        for p, v in zip(W.paths(op[2], op[3]), S.normalize(W.vectors(op[2], op[3]))):
            out.setdefault(op[1], {})[p] = v
    elif op[0] == "remove-identity":
        out.pop(op[1])
    elif op[0] == "remove-path":
        for rows in out.values():
            rows.pop(op[1], None)
        out = {i: rows for i, rows in out.items() if rows}
    return out


# ---------------------------------------------------------------- what a write writes


def test_enrol_writes_only_its_rows_and_remove_only_a_flag(tmp_path):
    x = _data(300, 16, 0)
    folder = tmp_path / "g"
    save_gallery(build_gallery(x[:290], [f"p{i % 29}" for i in range(290)], [f"{i}.jpg" for i in range(290)], {},
                 "flat"), folder)
    index_file = folder / "index-000001.faiss"
    stat, data = index_file.stat(), index_file.read_bytes()
    ids = add_to_gallery(folder, x[290:293], ["new"] * 3, ["a.jpg", "b.jpg", "c.jpg"])
    assert ids.tolist() == [290, 291, 292]
    record = 8 + 4 * 16
    assert (folder / "journal-000001.f32").stat().st_size == store.JOURNAL_HEADER + 3 * record
    assert index_file.read_bytes() == data and index_file.stat().st_ino == stat.st_ino  # untouched
    assert remove_from_gallery(folder, identity="p3") == 10
    assert index_file.read_bytes() == data
    meta = read_meta(folder)
    assert (meta["count"], meta["journal_rows"], meta["removed"], meta["generation"]) == (283, 3, 10, 1)
    g = load_gallery(folder)
    assert len(g) == 283 and "p3" not in g.names() and g.identities[-3:] == ["new"] * 3
    assert g.row_ids[-3:].tolist() == [290, 291, 292]


def test_update_gallery_reads_no_index_and_keeps_settings(tmp_path, monkeypatch):
    x = _data(40, 8, 1)
    folder = tmp_path / "g"
    save_gallery(build_gallery(x[:30], ["a"] * 30, [""] * 30, {"fingerprint": "f"}, "flat"), folder)
    real = store.read_snapshot
    monkeypatch.setattr(store, "read_snapshot", lambda f: pytest.fail("the add read the index"))
    with update_gallery(folder, fingerprint="f", dim=8) as g:
        g.add(x[30:], ["b"] * 10, [f"b{i}" for i in range(10)])
        g.settings["flip"] = True
    assert len(g) == 40 and g.added_ids.tolist() == list(range(30, 40))
    monkeypatch.setattr(store, "read_snapshot", real)
    g.add(x[:2], ["c"] * 2, ["", ""])  # after the block: in memory only
    assert len(g) == 42 and g.identities[-3:] == ["b", "c", "c"] and read_meta(folder)["count"] == 40
    assert read_meta(folder)["settings"] == {"flip": True} == load_gallery(folder).settings
    with pytest.raises(FacefuseError, match="built with model f but this model is z"):
        add_to_gallery(folder, x[:1], ["c"], [""], fingerprint="z")
    with pytest.raises(FacefuseError, match="dimension 9, the gallery 8"):
        add_to_gallery(folder, np.ones((1, 9), np.float32), ["c"], [""])
    assert read_meta(folder)["count"] == 40  # refused adds wrote nothing


@pytest.mark.parametrize("kind", S.KINDS.names())
def test_every_kind_removes_and_compacts_against_brute_force(tmp_path, kind):
    n, d = 1201, 24  # odd sizes
    x = _data(n + 40, d, 2)
    ids = [f"p{i % 97:03d}" for i in range(n + 40)]
    paths = [f"img{i}.jpg" for i in range(n + 40)]
    folder = tmp_path / kind
    save_gallery(build_gallery(x[:n], ids[:n], paths[:n], {}, kind), folder)
    add_to_gallery(folder, x[n:], ids[n:], paths[n:])  # journalled: rows of many identities
    remove_from_gallery(folder, identity="p005")
    remove_from_gallery(folder, path=paths[n + 3])     # a journalled row
    remove_from_gallery(folder, path=paths[7])          # a row of the index file
    live = np.array([i != "p005" and p not in (paths[n + 3], paths[7]) for i, p in zip(ids, paths)])
    names = sorted({i for i, keep in zip(ids, live) if keep})
    q = x[[5, 7, 102, n + 3, n + 10]] + 0.01 * _data(5, d, 3)  # the first four sit on removed rows
    exhaustive = dict(nprobe=10 ** 6, k_factor=64, ef_search=1024)
    sims = S.normalize(q).astype(np.float64) @ x.astype(np.float64).T
    sims[:, ~live] = -np.inf
    per_id = np.array([[s[[j for j, i in enumerate(ids) if i == name]].max() for name in names] for s in sims])
    want = [[names[j] for j in np.argsort(-row, kind="stable")[:4]] for row in per_id]
    for stage in ("pending", "compacted"):
        g = load_gallery(folder)
        assert len(g) == int(live.sum()) and sorted(g.names()) == names
        got = search_gallery(g, q, k=4, **exhaustive)
        for r, w in zip(got, want):
            found = [m["identity"] for m in r["matches"]]
            assert len(found) == 4 and "p005" not in found
            assert found[0] == w[0] and len(set(found) & set(w)) >= 3, (stage, found, w)
            assert all(m["path"] not in (paths[n + 3], paths[7]) for m in r["matches"])
        if stage == "pending":
            stats = compact_gallery(folder)
            assert (stats["folded"], stats["dropped"], stats["rows"]) == (40, 15, int(live.sum()))
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "gallery.db", "index-000002.faiss", "index.faiss"]
    blob = b"".join(p.read_bytes() for p in folder.iterdir() if p.is_file())
    assert b"p005" not in blob and b"p006" in blob
    assert paths[7].encode() not in blob and paths[n + 3].encode() not in blob
    if kind in ("flat", "ivf", "hnsw", "ivfpq"):  # kinds that keep full vectors: the removed ones are gone
        assert x[5].tobytes() not in blob and x[n + 3].tobytes() not in blob


def test_search_with_a_pending_journal_equals_the_compacted_one(tmp_path):
    x = _data(700, 32, 4)
    ids = [f"p{i % 70}" for i in range(700)]
    folder = tmp_path / "g"
    save_gallery(build_gallery(x[:500], ids[:500], [str(i) for i in range(500)], {}, "flat"), folder)
    for s in range(500, 700, 50):
        add_to_gallery(folder, x[s:s + 50], ids[s:s + 50], [str(i) for i in range(s, s + 50)])
    remove_from_gallery(folder, identity="p1")
    q = _data(60, 32, 5)
    pending = search_gallery(load_gallery(folder), q, k=5)
    compact_gallery(folder)
    assert search_gallery(load_gallery(folder), q, k=5) == pending
    assert compact_gallery(folder)["folded"] == 0  # nothing pending: nothing rewritten
    assert read_meta(folder)["generation"] == 2


def test_automatic_compaction_past_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "AUTO_COMPACT_ROWS", 10)
    x = _data(40, 8, 6)
    folder = tmp_path / "g"
    save_gallery(build_gallery(x[:20], ["a"] * 20, [str(i) for i in range(20)], {}, "flat"), folder)
    add_to_gallery(folder, x[20:29], ["b"] * 9, [str(i) for i in range(20, 29)])
    assert read_meta(folder)["generation"] == 1
    remove_from_gallery(folder, path="3")  # 9 journalled + 1 removed: compacted by this call
    meta = read_meta(folder)
    assert (meta["generation"], meta["journal_rows"], meta["removed"], meta["count"]) == (2, 0, 0, 28)
    assert not (folder / "journal-000001.f32").exists()


def test_remove_refusals_name_the_value_and_write_nothing(tmp_path):
    folder = tmp_path / "g"
    save_gallery(build_gallery(_data(6, 8, 7), list("aabbcc"), list("123456"), {}, "flat"), folder)
    before = (folder / "gallery.db").read_bytes()
    cases = [(dict(identity="zed"), "identity=zed: no such identity enrolled in"),
             (dict(path="9"), "path=9: no image with this path enrolled in"),
             (dict(identity="a", path="3"), "path=3: no image of identity a with this path enrolled in"),
             ({}, "identity=None: give identity=..., path=... or both")]
    for kw, msg in cases:
        with pytest.raises(FacefuseError, match=msg) as e:
            remove_from_gallery(folder, **kw)
        assert "\n" not in str(e.value) and "--" not in str(e.value)
    assert (folder / "gallery.db").read_bytes() == before
    assert remove_from_gallery(folder, identity="a", path="2") == 1
    with pytest.raises(FacefuseError, match="no such gallery index folder"):
        remove_from_gallery(tmp_path / "nope", identity="a")
    with pytest.raises(FacefuseError, match="not a gallery index"):
        compact_gallery(tmp_path)
    assert not (tmp_path / "gallery.db").exists() and not (tmp_path / ".lock").exists()


def test_in_memory_remove_and_save_leave_the_rows_out(tmp_path):
    x = _data(50, 8, 8)
    g = build_gallery(x, [f"p{i % 5}" for i in range(50)], [str(i) for i in range(50)], {}, "hnsw")
    assert g.remove(identity="p2") == 10 and len(g) == 40 and "p2" not in g.names()
    assert all(r["identity"] != "p2" for r in search_gallery(g, x[2::5], k=1, ef_search=256))
    save_gallery(g, tmp_path / "g")
    again = load_gallery(tmp_path / "g")
    assert again.index.ntotal == 40 and again.identities == g.identities and not again.removed.any()


# ---------------------------------------------------------------- version-1 folders


def test_version1_folder_is_read_as_is_and_upgraded_by_its_first_write(tmp_path):
    x = _data(30, 8, 9)
    ids, paths = [f"p{i % 3}" for i in range(30)], [f"{i}.jpg" for i in range(30)]
    folder = tmp_path / "old"
    _write_v1(folder, x, ids, paths)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    g = load_gallery(folder, fingerprint="abc", dim=8)
    assert g.identities == ids and read_meta(folder)["version"] == 1 and read_meta(folder)["count"] == 30
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == files  # reading wrote nothing
    inode = (folder / "index-000002.faiss").stat().st_ino
    add_to_gallery(folder, x[:2], ["new"] * 2, ["n1", "n2"])
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "gallery.db", "index-000002.faiss", "index.faiss",
                                                        "journal-000002.f32"]
    assert (folder / "index-000002.faiss").stat().st_ino == inode  # its vectors were not rewritten
    meta = read_meta(folder)
    assert (meta["version"], meta["generation"], meta["count"], meta["model"]) == (2, 2, 32, {"fingerprint": "abc"})
    g = load_gallery(folder)
    assert g.identities == ids + ["new"] * 2 and g.paths == paths + ["n1", "n2"]
    with pytest.raises(FacefuseError, match="built with model abc"):
        load_gallery(folder, fingerprint="zzz")


def test_damaged_folders_say_how_to_rebuild(tmp_path):
    x = _data(10, 8, 10)
    old = tmp_path / "old"
    _write_v1(old, x, ["a"] * 10, [""] * 10)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "count": 9, "identities": ["a"] * 9}))
    for call in (lambda: load_gallery(old), lambda: remove_from_gallery(old, identity="a")):
        with pytest.raises(FacefuseError, match="holds 10 vectors but meta.json lists 9.*; rebuild the index"):
            call()
    assert not (old / "gallery.db").exists()
    new = tmp_path / "new"
    save_gallery(build_gallery(x, ["a"] * 10, [""] * 10, {}, "flat"), new)
    add_to_gallery(new, x[:2], ["b"] * 2, ["", ""])
    with open(new / "journal-000001.f32", "r+b") as f:
        f.truncate(store.JOURNAL_HEADER + 40)
    for call in (lambda: load_gallery(new), lambda: add_to_gallery(new, x[:1], ["c"], [""])):
        with pytest.raises(FacefuseError, match="journal-000001.f32.*2 journalled rows.*rebuild the index"):
            call()
    (new / "index-000001.faiss").unlink()
    with pytest.raises(FacefuseError, match="index-000001.faiss: is missing; rebuild the index"):
        load_gallery(new)


# ---------------------------------------------------------------- crashes and concurrency


@pytest.fixture(scope="module")
def forkserver():
    """Worker processes forked from a server that imported facefuse's gallery (and faiss) once.
    (The server does not see the tests folder on its path, so store_workers itself, small, is
    imported by each worker.)"""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["facefuse.index.gallery"])
    return ctx


def _ops(rng: random.Random, model: dict, count: int) -> list:
    """A random sequence of writes that are all valid in turn, starting from ``model``."""
    ops, model, names = [], model, ["ann", "bob", "cid"]
    for i in range(count):
        r = rng.random()
        if r < 0.45 or not model:
            op = ("add", rng.choice(names), f"g{i}", rng.randint(1, 3))
        elif r < 0.6:
            op = ("remove-identity", rng.choice(sorted(model)))
        elif r < 0.85:
            op = ("remove-path", rng.choice(sorted(p for rows in model.values() for p in rows)))
        else:
            op = ("compact",)
        ops.append(op)
        model = _apply(model, op)
    return ops


def test_kill_at_every_step_of_every_write_leaves_the_model_state(tmp_path, forkserver):
    """From a version-1 folder (so its upgrade is crashed too), each write of a random sequence is
    killed at its 1st, 2nd, ... step, each time from the state before it, until it runs through.
    After every kill the folder opens and equals the model before the write or after it (after
    from the first step past its commit on), and the next write works on what the crash left."""
    x = S.normalize(W.vectors("g-seed", 6))
    folder, pre, log = tmp_path / "g", tmp_path / "pre", tmp_path / "steps"
    _write_v1(folder, x, ["ann", "ann", "bob", "bob", "cid", "cid"], W.paths("g-seed", 6))
    model = {n: {p: v for p, v in zip(W.paths("g-seed", 6)[2 * k:2 * k + 2], x[2 * k:2 * k + 2])}
             for k, n in enumerate(["ann", "bob", "cid"])}
    kills, seen_steps = 0, set()
    for op in _ops(random.Random(0), model, 14):
        after = _apply(model, op)
        shutil.rmtree(pre, ignore_errors=True)
        shutil.copytree(folder, pre, symlinks=True)
        k, applied = 1, False
        while True:
            log.unlink(missing_ok=True)
            p = forkserver.Process(target=W.crash_worker, args=(str(folder), op, k, str(log), 6))
            p.start()
            p.join(60)
            if p.exitcode == 0:
                break  # ran past its last step: the write was acknowledged
            assert p.exitcode == -signal.SIGKILL, (op, k, p.exitcode)
            kills += 1
            steps = log.read_text().split()
            seen_steps.add(steps[-1])
            state = _state(folder)
            now_after = _same(state, after)
            assert now_after or _same(state, model), (op, steps)
            assert now_after or not applied, f"{op}: applied at an earlier step, not at {steps}"
            applied |= now_after
            add_to_gallery(folder, W.vectors("probe", 1), ["probe"], ["probe/0"])  # writing on goes on
            assert _same(_state(folder), _apply(after if now_after else model, ("add", "probe", "probe", 1)))
            shutil.rmtree(folder)
            shutil.copytree(pre, folder, symlinks=True)
            k += 1
        assert _same(_state(folder), after), op
        model = after
    assert seen_steps >= {"journal-half-written", "journal-synced", "db-written", "committed", "index-written",
                          "old-files-deleted", "checkpointed"}
    assert kills > 40


def test_concurrent_writers_killed_at_random_while_readers_search(tmp_path, forkserver):
    """Four writers (adds, removes, compactions; automatic compaction every 12 pending rows) and
    two readers on one folder; three writers are killed with SIGKILL at random moments. Every
    acknowledged write is in the end state, every write not started is not, and the one each
    killed writer had in flight is there whole or not at all. Readers never fail nor see part
    of an add."""
    folder = tmp_path / "g"
    seed = S.normalize(W.vectors("seed", 5))
    save_gallery(build_gallery(seed, ["seed"] * 5, W.paths("seed", 5), {}, "flat"), folder)
    rng = random.Random(1)
    plans, groups = {}, {"seed": 5}
    for w in range(4):
        ops, live = [], []
        for i in range(40):  # long enough that the kills below land mid-plan on a fast, quiet machine too
            r = rng.random()
            if r < 0.55 or not live:
                n = rng.randint(1, 3)
                ops.append(("add", f"w{w}-{i}", f"w{w}-{i}", n))
                live.append((f"w{w}-{i}", n))
                groups[f"w{w}-{i}"] = n
            elif r < 0.7:
                ops.append(("remove-identity", live.pop(rng.randrange(len(live)))[0]))
            elif r < 0.9:
                ops.append(("remove-path", f"{live.pop(rng.randrange(len(live)))[0]}/0"))
            else:
                ops.append(("compact",))
        plans[w] = ops
    logs = {w: tmp_path / f"w{w}.log" for w in plans}
    writers = {w: forkserver.Process(target=W.writer, args=(str(folder), f"w{w}", plans[w], str(logs[w]), 12))
               for w in plans}
    stop, out = forkserver.Event(), forkserver.Queue()
    readers = [forkserver.Process(target=W.reader, args=(str(folder), groups, stop, out)) for _ in range(2)]
    for p in [*writers.values(), *readers]:
        p.start()
    killed = set()
    while len(killed) < 3 and any(p.is_alive() for w, p in writers.items() if w not in killed):
        time.sleep(rng.uniform(0.02, 0.15))
        alive = [w for w, p in writers.items() if p.is_alive() and w not in killed]
        if alive:
            w = rng.choice(alive)
            os.kill(writers[w].pid, signal.SIGKILL)
            killed.add(w)
    for p in writers.values():
        p.join(120)
    stop.set()
    results = [out.get(timeout=60) for _ in readers]
    for p in readers:
        p.join(60)
    assert all(reads > 0 for reads, _ in results) and [p for _, ps in results for p in ps] == []
    state = _state(folder)
    assert _same({"seed": state.pop("seed")}, _apply({}, ("add", "seed", "seed", 5)))
    for w, ops in plans.items():
        lines = logs[w].read_text().split("\n") if logs[w].exists() else []
        done = [int(s.split()[1]) for s in lines if s.startswith(("ack", "none"))]
        started = [int(s.split()[1]) for s in lines if s.startswith("start")]
        assert writers[w].exitcode in ((-signal.SIGKILL, 0) if w in killed else (0,))
        model: dict = {}
        for i in done:
            model = _apply(model, ops[i])
        mine = {i: rows for i, rows in state.items() if i.startswith(f"w{w}-")}
        flying = [i for i in started if i not in done]
        options = [model] + [_apply(model, ops[i]) for i in flying]
        assert any(_same(mine, m) for m in options), (w, sorted(mine), [sorted(m) for m in options])
    assert any(writers[w].exitcode == -signal.SIGKILL for w in killed)
