"""facefuse serve's security: API keys (stored hashed, 401 without a valid one, 403 for a read-only
key that writes), loopback unless told otherwise, limits on body bytes and photo pixels (a
decompression bomb included), and the service keeps serving after every refusal."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from click.testing import CliRunner
from PIL import Image
from test_serve_support import Running, assert_json_error, jpeg, make_gallery

from facefuse.core.errors import ParameterError
from facefuse.serve import ServeSettings
from facefuse.serve.cli import serve_command
from facefuse.serve.keys import KeyRing, add_key, digest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-auth")
    model, index, photos = make_gallery(root)
    keys = root / "keys.json"
    write, read = add_key(keys, "admin", "write"), add_key(keys, "viewer", "read")
    settings = ServeSettings(model=model, index=index, align="none", keys=keys, max_upload_bytes=200_000,
                             max_pixels=1_000_000)
    with Running(settings) as svc:
        yield svc, write, read, keys, photos


def test_keys_are_stored_hashed(world):
    _, write, read, keys, _ = world
    text = keys.read_text()
    assert write not in text and read not in text and digest(write) in text
    assert (keys.stat().st_mode & 0o777) == 0o600
    ring = KeyRing.load(keys)
    assert ring.check(write).role == "write" and ring.check(read).role == "read"
    assert ring.check(write[:-1]) is None and ring.check("") is None and ring.check(None) is None


def test_no_key_or_a_wrong_key_is_401(world):
    svc, write, _, _, _ = world
    with svc.client() as c:
        assert_json_error(c.post("/v1/search", files={"photo": jpeg(1)}), 401, "API key is needed")
        assert c.post("/v1/search", files={"photo": jpeg(1)}).headers["www-authenticate"] == "Bearer"
        assert_json_error(c.get("/v1/identities", headers={"X-API-Key": write + "x"}), 401, "not recognised")
        assert_json_error(c.get("/metrics"), 401)
        assert_json_error(c.delete("/v1/identities/ann"), 401)
        # open: the page, liveness, the schema
        for url in ("/", "/health", "/openapi.json"):
            assert c.get(url).status_code == 200, url
    with svc.client(write) as c:
        assert c.get("/health").json()["gallery"]["rows"] == 12  # nothing was removed


def test_a_read_key_reads_and_gets_403_on_writes(world):
    svc, _, read, _, _ = world
    with svc.client(read) as c:
        assert c.post("/v1/search", files={"photo": jpeg(1)}).status_code == 200
        assert c.get("/v1/identities").status_code == 200 and c.get("/metrics").status_code == 200
        assert_json_error(c.post("/v1/identities/mal/faces", files={"photo": jpeg(2)}), 403, "read-only")
        assert_json_error(c.delete("/v1/identities/ann"), 403, "read-only")
        assert "mal" not in c.get("/v1/identities").json()["identities"]


def test_a_write_key_writes_and_bearer_works_too(world):
    svc, write, _, _, _ = world
    with svc.client(headers={"Authorization": f"Bearer {write}"}) as c:
        r = c.post("/v1/identities/kim/faces", files={"photo": jpeg(3)})
        assert r.status_code == 201, r.text
        assert c.delete("/v1/identities/kim").json()["removed"] == 1


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` (one tiny compressed row): a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("body, status, fragment", [
    (_png_header_only(5_000, 5_000), 413, "more than the limit of 1000000"),   # 25 MP claimed in < 200 bytes
    (_png_header_only(100_000, 100_000), 413, "decompression bomb"),            # past PIL's own bomb limit
    (_png(1200, 900), 413, "1080000 pixels"),                                   # real pixels, over the limit
    (b"\0" * 250_000, 413, "over the limit of 200000"),                         # body bytes
], ids=["bomb-header", "pil-bomb", "pixels", "bytes"])
def test_limits_refuse_with_413_and_serving_goes_on(world, body, status, fragment):
    svc, write, _, _, _ = world
    with svc.client(write) as c:
        assert_json_error(c.post("/v1/search", files={"photo": ("p.png", body, "image/png")}), status, fragment)
        assert c.post("/v1/search", files={"photo": jpeg(4)}).status_code == 200


def test_a_body_without_length_is_411(world):
    svc, write, _, _, _ = world
    def chunks():
        yield b"--x\r\n"
    with svc.client(write) as c:
        r = c.post("/v1/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert_json_error(r, 411, "Content-Length")


def test_beyond_loopback_needs_keys(tmp_path):
    with pytest.raises(ParameterError, match="host=0.0.0.0: serving beyond loopback needs API keys"):
        ServeSettings(model=tmp_path / "m.pt", index=tmp_path, host="0.0.0.0")
    ServeSettings(model=tmp_path / "m.pt", index=tmp_path, host="0.0.0.0", keys=tmp_path / "k.json")
    ServeSettings(model=tmp_path / "m.pt", index=tmp_path, host="::1")  # loopback too


def test_cli_adds_a_key_and_words_errors_as_its_options(tmp_path):
    keys = tmp_path / "keys.json"
    r = CliRunner().invoke(serve_command, ["--keys", str(keys), "--add-key", "ops", "--role", "read"])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip()
    assert KeyRing.load(keys).check(key).name == "ops" and key not in keys.read_text()
    for args, fragment in ((["--add-key", "x"], "--keys: --add-key needs --keys FILE"),
                           (["--keys", str(keys), "--add-key", "ops"], "--name ops: "),
                           (["--model", "m", "--index", str(tmp_path), "--host", "0.0.0.0"],
                            "--host 0.0.0.0: serving beyond loopback needs API keys (--keys FILE)"),
                           (["--model", "m", "--index", str(tmp_path), "--max-batch", "0"], "--max-batch 0: must be"),
                           (["--index", str(tmp_path)], "--model: required"),
                           (["--model", str(tmp_path / "none.onnx"), "--index", str(tmp_path)], "no such model file")):
        r = CliRunner().invoke(serve_command, args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.output)
        assert fragment in lines[0], lines[0]
    assert json.loads(keys.read_text())["keys"][0]["role"] == "read"
