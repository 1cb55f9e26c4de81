"""facefuse serve's endpoints, on a real service on a loopback port: each answer agrees with an
independent computation (numpy cosines of the API's embeddings, brute-force nearest identities),
every bad request gets a one-line JSON error with a 4xx code, and the schema is served."""

from __future__ import annotations

import numpy as np
import pytest
from test_serve_support import NAMES, Running, assert_json_error, jpeg, make_gallery

import facefuse
from facefuse.serve import ServeSettings

THRESHOLDS = {"at_far": [{"far": 0.01, "threshold": 0.9}, {"far": 0.001, "threshold": 0.97}],
              "provenance": {"source": "test pairs"}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-api")
    model, index, photos = make_gallery(root, thresholds=THRESHOLDS)
    with Running(ServeSettings(model=model, index=index, align="none", max_wait_ms=2.0)) as svc:
        yield svc, facefuse.load_model(model), photos


def brute_force(model, photos, query: bytes):
    """Per-identity best cosine of the query against every enrolled photo (numpy only)."""
    import io

    from PIL import Image

    q = model.embed(Image.open(io.BytesIO(query)))[0]
    best = {}
    for name, paths in photos.items():
        best[name] = float(np.max(model.embed(paths) @ q))
    return sorted(best.items(), key=lambda kv: -kv[1])


def test_health_openapi_and_page(world):
    svc, model, _ = world
    with svc.client() as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["model"]["fingerprint"] == model.fingerprint and h["gallery"]["rows"] == 12
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/v1/search", "/v1/verify", "/v1/identities", "/v1/identities/{identity}/faces",
                "/v1/identities/{identity}", "/metrics", "/health"} <= set(paths)
        assert "multipart/form-data" in paths["/v1/search"]["post"]["requestBody"]["content"]
        page = c.get("/")
        assert page.status_code == 200 and "<canvas" in page.text and page.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("seed", [3, 11])
def test_search_matches_brute_force(world, seed):
    svc, model, photos = world
    query = jpeg(seed)
    ranked = brute_force(model, photos, query)
    with svc.client() as c:
        r = c.post("/v1/search", params={"top_k": 3}, files={"photo": ("q.jpg", query, "image/jpeg")})
    assert r.status_code == 200, r.text
    (face,) = r.json()["faces"]
    assert [m["identity"] for m in face["matches"]] == [n for n, _ in ranked[:3]]
    np.testing.assert_allclose([m["score"] for m in face["matches"]], [s for _, s in ranked[:3]], atol=1e-5)
    # decided at the calibrated threshold nearest FAR 1e-3 (0.97): a random photo is unknown
    assert r.json()["far"] == 0.001 and face["threshold"] == pytest.approx(0.97)
    assert face["identity"] == (ranked[0][0] if ranked[0][1] >= 0.97 else "unknown")
    assert face["box"] == [0.0, 0.0, 72.0, 72.0] and r.json()["width"] == 72


def test_search_an_enrolled_photo_names_it_and_hides_server_paths(world):
    svc, _, photos = world
    with svc.client() as c:
        r = c.post("/v1/search", params={"far": 0.01}, files={"photo": photos["cid"][1].read_bytes()})
    face = r.json()["faces"][0]
    assert face["identity"] == "cid" and face["score"] == pytest.approx(1.0, abs=1e-5)
    assert face["threshold"] == pytest.approx(0.9) and r.json()["far"] == 0.01
    assert all("/" not in m["path"] for m in face["matches"])  # file names only


def test_verify_is_the_cosine_decided_at_the_threshold(world):
    svc, model, photos = world
    a, b = photos["ann"][0], photos["bob"][0]
    ea, eb = model.embed([a, b])
    with svc.client() as c:
        same = c.post("/v1/verify", files={"a": a.read_bytes(), "b": photos["ann"][1].read_bytes()}).json()
        diff = c.post("/v1/verify", params={"threshold": float(ea @ eb) + 1e-3},
                      files={"a": a.read_bytes(), "b": b.read_bytes()}).json()
    assert diff["score"] == pytest.approx(float(ea @ eb), abs=1e-5) and diff["same"] is False
    assert diff["threshold_source"] == "threshold given" and diff["far"] is None
    expected = float(np.dot(*model.embed([a, photos["ann"][1]])))
    assert same["score"] == pytest.approx(expected, abs=1e-5)
    assert same["same"] == (expected >= 0.97) and same["far"] == 0.001 and "FAR 0.001" in same["threshold_source"]


def test_enrol_list_search_remove(world):
    svc, _, _ = world
    photo = jpeg(101)
    with svc.client() as c:
        r = c.post("/v1/identities/Zoë Q/faces", files={"photo": ("z.jpg", photo, "image/jpeg")})
        assert r.status_code == 201, r.text
        label = r.json()["image"]
        assert label.startswith("upload:") and r.json()["gallery"]["rows"] == 13
        assert c.get("/v1/identities").json()["identities"] == NAMES + ["Zoë Q"]
        hit = c.post("/v1/search", files={"photo": photo}).json()["faces"][0]
        assert hit["identity"] == "Zoë Q" and hit["matches"][0]["path"] == label
        assert c.delete(f"/v1/identities/Zoë Q/faces/{label}").json()["removed"] == 1
        assert "Zoë Q" not in c.get("/v1/identities").json()["identities"]
        assert c.post("/v1/search", files={"photo": photo}).json()["faces"][0]["matches"][0]["identity"] != "Zoë Q"
        assert_json_error(c.delete("/v1/identities/Zoë Q"), 404, "not enrolled")
        # enrol twice, remove the identity whole
        for seed in (5, 6):
            assert c.post("/v1/identities/eve/faces", files={"photo": jpeg(seed)}).status_code == 201
        assert c.delete("/v1/identities/eve").json()["removed"] == 2
        assert c.get("/health").json()["gallery"]["rows"] == 12


@pytest.mark.parametrize("request_, status, fragment", [
    (("post", "/v1/search", {"files": {"photo": b"not an image"}}), 422, "photo: not an image"),
    (("post", "/v1/search", {"files": {"other": jpeg(1)}}), 422, "photo: Field required"),
    (("post", "/v1/search", {"files": {"photo": b""}}), 422, "photo: empty upload"),
    (("post", "/v1/search", {"files": {"photo": jpeg(1)[:200]}}), 422, "photo: corrupt or truncated"),
    (("post", "/v1/search", {"params": {"top_k": 0}, "files": {"photo": jpeg(1)}}), 400, "top_k=0"),
    (("post", "/v1/search", {"params": {"top_k": "x"}, "files": {"photo": jpeg(1)}}), 422, "top_k"),
    (("post", "/v1/search", {"params": {"align": "eyes"}, "files": {"photo": jpeg(1)}}), 400, "align=eyes"),
    (("post", "/v1/search", {"params": {"far": 0.5}, "files": {"photo": jpeg(1)}}), 400, "stores thresholds at FAR"),
    (("post", "/v1/search", {"params": {"far": 0.01, "threshold": 0.5}, "files": {"photo": jpeg(1)}}), 400,
     "not both"),
    (("post", "/v1/verify", {"files": {"a": jpeg(1)}}), 422, "b: Field required"),
    (("post", "/v1/identities/unknown/faces", {"files": {"photo": jpeg(1)}}), 400, "reserved"),
    (("post", "/v1/identities/%20ann/faces", {"files": {"photo": jpeg(1)}}), 400, "leading or trailing"),
    (("delete", "/v1/identities/nobody", {}), 404, "nobody: not enrolled"),
    (("delete", "/v1/identities/ann/faces/passwd", {}), 400, "not an enrolment label"),
    (("delete", "/v1/identities/ann/faces/..%2F..%2Fetc%2Fpasswd", {}), 404, "Not Found"),
    (("delete", "/v1/identities/ann/faces/upload:0123456789abcdef", {}), 404, "not enrolled"),
    (("get", "/v1/nothing", {}), 404, "Not Found"),
    (("get", "/v1/search", {}), 405, "Method Not Allowed"),
])
def test_bad_requests_get_one_line_json_errors(world, request_, status, fragment):
    svc, _, _ = world
    method, url, kw = request_
    with svc.client() as c:
        assert_json_error(getattr(c, method)(url, **kw), status, fragment)
        assert c.get("/health").status_code == 200  # and the service goes on


def test_metrics_in_prometheus_text_format(world):
    svc, _, photos = world
    with svc.client() as c:
        c.post("/v1/search", files={"photo": photos["ann"][0].read_bytes()})
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE"), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['facefuse_requests_total{route="/v1/search",method="POST",status="200"}'] >= 1
    assert samples["facefuse_batch_faces_count"] >= 1 and samples["facefuse_faces_embedded_total"] >= 1
    assert samples["facefuse_gallery_rows"] >= 12
    assert samples['facefuse_request_seconds_bucket{route="/v1/search",le="+Inf"}'] == \
        samples['facefuse_request_seconds_count{route="/v1/search"}']


def test_every_face_of_a_photo_with_landmark_alignment(lfw, tmp_path):
    """Two raw LFW photos side by side: MTCNN finds both faces, each is searched; the answer equals
    the API's own ``Gallery.search_photo`` of the same photo."""
    import io

    from PIL import Image

    from helpers import make_model_file

    raw = sorted(p for p in (lfw / "raw-fold0").iterdir() if len(list((lfw / "lfw-112" / p.name).glob("*.jpg"))) >= 2)
    people = raw[:3]
    gallery_src = tmp_path / "gallery"
    for person in people:
        (gallery_src / person.name).mkdir(parents=True)
        for crop in sorted((lfw / "lfw-112" / person.name).glob("*.jpg"))[:2]:
            (gallery_src / person.name / crop.name).write_bytes(crop.read_bytes())
    model = facefuse.load_model(make_model_file(tmp_path / "model.pt", size=112))
    facefuse.build_gallery(gallery_src, tmp_path / "index", model)
    a, b = (sorted(p.glob("*.jpg"))[0] for p in people[:2])
    scene = Image.new("RGB", (500, 250))
    scene.paste(Image.open(a).convert("RGB"), (0, 0))
    scene.paste(Image.open(b).convert("RGB"), (250, 0))
    buf = io.BytesIO()
    scene.save(buf, "PNG")
    with Running(ServeSettings(model=tmp_path / "model.pt", index=tmp_path / "index")) as svc, svc.client() as c:
        r = c.post("/v1/search", files={"photo": ("scene.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["align"] == "landmarks" and len(got["faces"]) >= 2
    centres = sorted((f["box"][0] + f["box"][2]) / 2 for f in got["faces"][:2])
    assert centres[0] < 250 < centres[1]  # one face in each half
    assert all(len(f["landmarks"]) == 5 and f["detection_score"] > 0.9 for f in got["faces"][:2])
    expected = facefuse.open_gallery(tmp_path / "index", model).search_photo(scene, align="landmarks").to_dict()
    assert len(expected["faces"]) == len(got["faces"])
    for e, g in zip(expected["faces"], got["faces"]):
        assert e["box"] == g["box"] and e["identity"] == g["identity"]
        np.testing.assert_allclose([m["score"] for m in e["matches"]], [m["score"] for m in g["matches"]], atol=1e-5)


def test_a_gallery_with_everyone_removed_answers_unknown(tmp_path):
    model, index, photos = make_gallery(tmp_path, names=["solo"], per_id=1)
    with Running(ServeSettings(model=model, index=index, align="none")) as svc, svc.client() as c:
        assert c.delete("/v1/identities/solo").json()["removed"] == 1
        face = c.post("/v1/search", files={"photo": photos["solo"][0].read_bytes()}).json()["faces"][0]
        assert face["identity"] == "unknown" and face["matches"] == []
        assert c.post("/v1/identities/solo/faces", files={"photo": photos["solo"][0].read_bytes()}).status_code == 201
        assert c.post("/v1/search", files={"photo": photos["solo"][0].read_bytes()}).json()["faces"][0]["identity"] \
            == "solo"
