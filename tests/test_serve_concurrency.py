"""Micro-batching and concurrency: the batcher gathers concurrent requests into one model run and
routes each its own rows; concurrent searches through the service answer as sequential ones;
searches go on during enrolments and removals and see only whole galleries; ``facefuse index add``
from a shell and the service, writing one folder at once, lose nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_serve_support import NAMES, Running, jpeg, make_gallery

import facefuse
from facefuse.serve import ServeSettings
from facefuse.serve.batcher import MicroBatcher


# ---------------------------------------------------------------- the batcher alone


def _fake_run(batches):
    def run(items):
        batches.append(list(items))
        return np.asarray(items, np.float32)[:, None] * np.ones((1, 3), np.float32)
    return run


async def _requests(batcher, jobs, delay_s=0.0):
    """Each job: announce, 'decode' (sleep), submit; returns each job's rows."""
    async def one(items):
        with batcher.expect() as ticket:
            await asyncio.sleep(delay_s)
            return await batcher.embed(items, ticket)
    return await asyncio.gather(*(one(items) for items in jobs))


def _with_batcher(max_batch, max_wait_s, jobs, delay_s=0.0, run=None):
    batches = []

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(run or _fake_run(batches), ex, max_batch=max_batch, max_wait_s=max_wait_s)
            b.start()
            try:
                return await asyncio.wait_for(_requests(b, jobs, delay_s), 20)
            finally:
                await b.stop()
    return asyncio.run(main()), batches


def test_concurrent_requests_share_one_run_and_get_their_own_rows():
    jobs = [[1.0], [2.0, 3.0], [4.0], [5.0, 6.0, 7.0], [8.0]]
    rows, batches = _with_batcher(64, 10.0, jobs, delay_s=0.01)  # long wait: only arrivals end it
    assert batches == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]]
    for items, got in zip(jobs, rows):
        np.testing.assert_array_equal(got[:, 0], items)


def test_max_batch_bounds_a_run_and_one_means_no_batching():
    jobs = [[float(i)] for i in range(10)]
    rows, batches = _with_batcher(4, 10.0, jobs, delay_s=0.01)
    assert max(len(b) for b in batches) <= 4 and sorted(x for b in batches for x in b) == list(range(10))
    assert [float(r[0, 0]) for r in rows] == list(range(10))
    rows, batches = _with_batcher(1, 10.0, jobs)
    assert [len(b) for b in batches] == [1] * 10


def test_a_lone_request_does_not_wait_for_the_maximum_wait():
    # nobody else is expected, so a 1000 s wait never starts (wait_for's 20 s would fail the test)
    rows, batches = _with_batcher(64, 1000.0, [[7.0]])
    assert batches == [[7.0]]


def test_a_failed_run_fails_every_request_of_the_batch():
    def run(items):
        raise RuntimeError("model exploded")
    with pytest.raises(RuntimeError, match="model exploded"):
        _with_batcher(64, 10.0, [[1.0], [2.0]], run=run)


# ---------------------------------------------------------------- through the service


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-conc")
    model, index, photos = make_gallery(root)
    with Running(ServeSettings(model=model, index=index, align="none", max_wait_ms=200.0, max_batch=16)) as svc:
        yield svc, root, photos


def test_concurrent_searches_are_batched_and_answer_as_sequential_ones(world):
    svc, _, _ = world
    queries = [jpeg(1000 + i) for i in range(24)]
    with svc.client() as c:
        alone = [c.post("/v1/search", files={"photo": q}).json() for q in queries]
    before = svc.service.metrics.batch_size.count
    with svc.client() as c, ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda q: c.post("/v1/search", files={"photo": q}).json(), queries))
    runs = svc.service.metrics.batch_size.count - before
    assert runs < len(queries)  # some requests shared a model run
    for a, t in zip(alone, together):
        assert [m["identity"] for m in a["faces"][0]["matches"]] == [m["identity"] for m in t["faces"][0]["matches"]]
        np.testing.assert_allclose([m["score"] for m in a["faces"][0]["matches"]],
                                   [m["score"] for m in t["faces"][0]["matches"]], atol=1e-5)


def test_searches_go_on_during_enrolments_and_removals(world):
    svc, _, _ = world
    enrolled = [f"new{i}" for i in range(8)]
    statuses = []

    def writer():
        with svc.client() as c:
            for i, name in enumerate(enrolled):
                statuses.append(c.post(f"/v1/identities/{name}/faces", files={"photo": jpeg(2000 + i)}).status_code)
            for name in enrolled[::2]:
                statuses.append(c.delete(f"/v1/identities/{name}").status_code)

    def searcher(seed):
        seen = []
        with svc.client() as c:
            for k in range(12):
                r = c.post("/v1/search", params={"top_k": 20}, files={"photo": jpeg(seed * 100 + k)})
                statuses.append(r.status_code)
                seen.append({m["identity"] for m in r.json()["faces"][0]["matches"]})
        return seen

    with ThreadPoolExecutor(5) as pool:
        w = pool.submit(writer)
        seen = [s for f in [pool.submit(searcher, k) for k in range(4)] for s in f.result()]
        w.result()
    assert set(statuses) <= {200, 201}, statuses
    assert all(NAMES[0] in s and set(NAMES) <= s for s in seen)  # never a half-written gallery
    with svc.client() as c:
        assert c.get("/v1/identities").json()["identities"] == NAMES + enrolled[1::2]
        for name in enrolled[1::2]:
            assert c.delete(f"/v1/identities/{name}").status_code == 200


def test_shell_index_add_and_the_service_lose_nothing(world, tmp_path):
    svc, root, _ = world
    from helpers import write_identities

    shell = write_identities(tmp_path / "shell", ["sh0", "sh1"], 4, seed=9)
    index = svc.service.settings.index
    rows0 = facefuse.open_gallery(index).info().size
    cmd = [sys.executable, "-c", "from facefuse.cli import main; main()", "index", "add", str(index)]
    procs = [subprocess.Popen(cmd + [str(p) for p in paths] + ["--identity", name], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for name, paths in shell.items()]
    acked = []
    with svc.client() as c:  # enrol until both shells are done (they start slower), at most 300
        while (len(acked) < 8 or any(p.poll() is None for p in procs)) and len(acked) < 300:
            acked.append(c.post(f"/v1/identities/svc{len(acked) % 8}/faces",
                                files={"photo": jpeg(3000 + len(acked))}).status_code)
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert acked == [201] * len(acked)
    with svc.client() as c:
        names = c.get("/v1/identities").json()["identities"]
        assert c.get("/health").json()["gallery"]["rows"] == rows0 + 8 + len(acked)
        # the service's own snapshot sees the shell's rows
        hit = c.post("/v1/search", files={"photo": shell["sh1"][2].read_bytes()}).json()["faces"][0]
    assert set(names) >= set(shell) | {f"svc{i}" for i in range(8)}
    assert hit["matches"][0]["identity"] == "sh1" and hit["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def _blocked(fn, release: "threading.Event", entered: "threading.Event"):
    def wrapper(*a, **kw):
        entered.set()
        assert release.wait(30), "never released"
        return fn(*a, **kw)
    return wrapper


def test_a_model_run_in_progress_does_not_block_the_event_loop(world):
    """While a batch is held inside the model-run thread, the loop still answers other requests."""
    svc, _, _ = world
    import threading

    b = svc.service.batcher
    release, entered = threading.Event(), threading.Event()
    original = b._run
    b._run = _blocked(original, release, entered)
    try:
        with ThreadPoolExecutor(1) as pool, svc.client() as c:
            pending = pool.submit(c.post, "/v1/search", files={"photo": jpeg(1)})
            assert entered.wait(30)
            assert c.get("/health").status_code == 200 and c.get("/v1/identities").status_code == 200
            assert not pending.done()  # the search is still inside its model run
            release.set()
            assert pending.result(30).status_code == 200
    finally:
        release.set()
        b._run = original


def test_searches_do_not_wait_for_an_enrolment(world):
    """An enrolment held inside its gallery write (writer lock taken): searches are answered meanwhile."""
    svc, _, _ = world
    import threading

    gallery = svc.service.gallery
    release, entered = threading.Event(), threading.Event()
    gallery.add_vectors = _blocked(type(gallery).add_vectors.__get__(gallery), release, entered)
    try:
        with ThreadPoolExecutor(1) as pool, svc.client() as c:
            pending = pool.submit(c.post, "/v1/identities/held/faces", files={"photo": jpeg(5)})
            assert entered.wait(30)
            for seed in range(3):
                assert c.post("/v1/search", files={"photo": jpeg(seed)}).status_code == 200
            assert not pending.done()  # not answered before it is durable
            release.set()
            assert pending.result(30).status_code == 201
            assert c.delete("/v1/identities/held").status_code == 200
    finally:
        release.set()
        del gallery.add_vectors
