"""``facefuse embed``: one process and two torchrun (gloo) processes write the same rows, in the same
order, with one manifest; ``read_embed_folder`` reads the folder back; bad inputs are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import make_model_file, run_cli, write_faces
from facefuse.core.errors import FacefuseError
from facefuse.export.extract import read_embed_folder, rank_rows

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    faces = write_faces(tmp / "faces", n_identities=3, n_images=5, size=32)
    model = make_model_file(tmp / "model.pt", dim=8, size=32, random_bn=True)
    return tmp, faces, model


def _embed(n, source, model, out, *extra):
    cmd = [sys.executable, "-m", "facefuse.cli", "embed", str(source), "--model", str(model), "--out", str(out),
           "--batch-size", "4", "--workers", "0", *extra]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *cmd[1:]]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True)


def test_two_processes_write_the_one_process_rows(setup):
    tmp, faces, model = setup
    for n in (1, 2):
        r = _embed(n, faces, model, tmp / f"emb{n}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("embedded 15 images (dim 8)") == 1, r.stdout
    one, two = read_embed_folder(tmp / "emb1"), read_embed_folder(tmp / "emb2")
    assert np.array_equal(one[0], two[0])  # the same batches on each rank: equal bit for bit
    assert one[1] == two[1] == [f"person_{i // 5:02d}" for i in range(15)]
    assert one[2] == two[2] == [str(faces / f"person_{i // 5:02d}" / f"img_{i % 5:02d}.jpg") for i in range(15)]
    assert one[0].dtype == np.float32 and np.allclose(np.linalg.norm(one[0], axis=1), 1, atol=1e-6)
    m = json.loads((tmp / "emb2" / "manifest.json").read_text())
    assert m["dim"] == 8 and m["count"] == 15 and m["world_size"] == 2 and len(m["model"]["fingerprint"]) > 8
    assert m["shards"] == [{"file": "embeddings-00000-of-00002.npy", "start": 0, "rows": 8},
                           {"file": "embeddings-00001-of-00002.npy", "start": 8, "rows": 7}]
    assert np.load(tmp / "emb2" / "embeddings-00001-of-00002.npy").shape == (7, 8)

    # the embedder's own rows (export.runtime) are the reference
    from facefuse.export.runtime import load_embedder
    ref, _ = load_embedder(model).embed_paths(one[2], batch_size=4, workers=0)
    np.testing.assert_allclose(one[0], ref, atol=1e-6)

    # bad inputs: an existing output folder is not overwritten; shards of different dimensions
    before = (tmp / "emb2" / "manifest.json").read_bytes()
    res = run_cli("embed", faces, "--model", model, "--out", tmp / "emb2")
    assert res.exit_code == 2 and "--out" in res.output and "already holds embeddings" in res.output
    assert len(res.output.strip().splitlines()) == 1 and (tmp / "emb2" / "manifest.json").read_bytes() == before
    np.save(tmp / "emb2" / "embeddings-00001-of-00002.npy", np.zeros((7, 9), np.float32))
    with pytest.raises(FacefuseError, match="embeddings-00001-of-00002.npy: embeddings of dimension 9, but the "
                                            "other shards have 8"):
        read_embed_folder(tmp / "emb2")


def test_list_file_and_rows_per_rank(setup, tmp_path):
    _, faces, model = setup
    lst = tmp_path / "list.txt"
    lst.write_text(f"{faces}/person_02/img_01.jpg\tbob\n# comment\n{faces}/person_00/img_03.jpg\n")
    r = run_cli("embed", lst, "--model", model, "--out", tmp_path / "emb", "--workers", 0)
    assert r.exit_code == 0, r.output
    emb, labels, paths = read_embed_folder(tmp_path / "emb")
    assert emb.shape == (2, 8) and labels == ["bob", "person_00"] and paths[0].endswith("person_02/img_01.jpg")
    for count, batch, world in ((15, 4, 2), (15, 4, 3), (3, 4, 3), (100, 7, 5)):
        parts = [rank_rows(count, batch, world, r) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == count
        assert all(a[1] == b[0] and a[1] % batch == 0 for a, b in zip(parts, parts[1:]) if a[1] < count)
    r = run_cli("embed", tmp_path / "missing", "--model", model, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "no such folder or list file" in r.output


def test_index_build_from_embed_folders_reproduces_the_image_gallery(setup, tmp_path):
    """`facefuse embed` under torchrun, then `index build --embeddings EMB/` (labels from the folder),
    gives the gallery that `index build` from the images gives, row for row."""
    tmp, faces, model = setup
    from facefuse.index.gallery import load_gallery

    r = _embed(2, faces, model, tmp_path / "emb")
    assert r.returncode == 0, r.stderr[-3000:]
    for args, out in ((["--embeddings", tmp_path / "emb", "--model", model], "from-emb"),
                      ([faces, "--model", model, "--workers", 0, "--batch-size", 4], "from-images")):
        res = run_cli("index", "build", *args, "--kind", "flat", "-o", tmp_path / out)
        assert res.exit_code == 0, res.output
    a, b = load_gallery(tmp_path / "from-emb"), load_gallery(tmp_path / "from-images")
    assert a.identities == b.identities and [str(p) for p in a.paths] == [str(p) for p in b.paths]
    xa, xb = a.index.reconstruct_n(0, len(a)), b.index.reconstruct_n(0, len(b))
    np.testing.assert_allclose(xa, xb, atol=1e-6)
