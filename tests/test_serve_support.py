"""Shared by the ``test_serve_*`` modules (no tests here): a tiny model and gallery, and a real
service on a loopback port, run in a thread (:class:`Running`) or as ``python -m facefuse.serve``
in a subprocess (:func:`start_process`)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from helpers import make_model_file, write_identities

NAMES = ["ann", "bob", "cid", "dee"]
REPO = Path(__file__).resolve().parent.parent


def make_gallery(root: Path, names=NAMES, per_id: int = 3, **model_kw):
    """``root/model.pt`` (random, 32-d, 64 px) and ``root/index`` built from ``root/photos``."""
    import facefuse

    model_path = make_model_file(root / "model.pt", **model_kw)
    photos = write_identities(root / "photos", names, per_id)
    facefuse.build_gallery(root / "photos", root / "index", facefuse.load_model(model_path))
    return model_path, root / "index", photos


def jpeg(seed: int, size=(72, 72)) -> bytes:
    """A small random JPEG (not any enrolled photo)."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    return buf.getvalue()


class Running:
    """``facefuse.serve`` for ``settings`` on 127.0.0.1:<free port>, uvicorn in a daemon thread."""

    def __init__(self, settings):
        import uvicorn

        from facefuse.serve import create_app
        from facefuse.serve.cli import _listen

        self.app = create_app(settings)
        self.service = self.app.state.service
        sock = _listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the service did not start"
            time.sleep(0.02)

    def client(self, key: str | None = None, headers: dict | None = None, **kw) -> httpx.Client:
        headers = {**({"X-API-Key": key} if key else {}), **(headers or {})}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_process(*args, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """``python -m facefuse.serve ARGS --port 0`` in its own process; returns it and its URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "facefuse.serve", *map(str, args), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO.parent)
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return proc, f"http://127.0.0.1:{m.group(1)}"
    proc.kill()
    raise AssertionError("the service did not start:\n" + "".join(lines))


def assert_json_error(r: httpx.Response, status: int, *fragments: str) -> None:
    """A JSON error answer: ``status``, one line, every fragment in it."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "status"} and body["status"] == status, body
    assert "\n" not in body["error"] and "Traceback" not in body["error"], body
    for f in fragments:
        assert f in body["error"], body["error"]
