"""facefuse serve under load, on loopback only: latency and throughput, then faults.

The service runs as ``python -m facefuse.serve`` in its own process (``--threads`` decode/search
threads, one model-run thread); this process is the load generator: ``--clients`` concurrent
keep-alive HTTP/1.1 connections (plain asyncio sockets, pre-built multipart requests, so the
client spends little CPU on the same cores), each sending its next request when the last one is
answered. Every case is bounded by ``--requests`` and ``--max-seconds``.

Cases, each at 1, 8 and 32 clients and with micro-batching on (``--max-batch``, ``--max-wait-ms``)
and off (``--max-batch 1``):

- ``crop``: search of a 112 x 112 lfw-112 crop (already aligned: ``align=none``);
- ``photo``: search of a raw 250 x 250 LFW photo (every face found by MTCNN: ``align=landmarks``).

Then ``mixed``: 32 clients, searches with enrolments and removals (of faces this run enrolled) in
between; every answer's status is counted and the gallery is checked at the end (every acknowledged
enrolment there unless its removal was acknowledged). ``fault``: an enrolment storm killed with
``SIGKILL`` mid-way, a restart on the same folder, the same check; then malformed, oversized, bomb,
unauthenticated and read-only-writing requests, which must all get 4xx while searches go on.

Baselines in this process before the service starts: ONNX Runtime alone embedding batches of 64
(images/s), and the whole search of one crop inside one Python process (decode, embed, search;
p50), which is what a resident service adds its HTTP cost to.

The gallery: 4 lfw-112 crops each of the first ``--identities`` people of raw-fold0 with at least 5
crops; crop queries are those people's other crops and other people's (unknown) crops. The model:
``--model`` (an ONNX export), default ``runs/lfw`` exported to a temporary file. The load average
(1 min) before and after each case is recorded: this machine is shared.

    python benchmarks/bench_serve.py
    python benchmarks/bench_serve.py --model /tmp/serve-model.onnx --requests 300

Writes benchmarks/results/serve-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_results  # noqa: E402

from facefuse.core.paths import REPO_ROOT, shared_data_dir  # noqa: E402

HOST = "127.0.0.1"
BOUNDARY = "ffbench7d1c"


# ---------------------------------------------------------------- requests on the wire


def multipart(path: str, files: dict[str, bytes], key: str | None = None, method: str = "POST") -> bytes:
    body = b"".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.jpg"\r\n'
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, data in files.items())
    body += f"--{BOUNDARY}--\r\n".encode() if files else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
    if files:
        head += f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
    head += f"Content-Length: {len(body)}\r\n" + (f"X-API-Key: {key}\r\n" if key else "") + "\r\n"
    return head.encode() + body


def simple(method: str, path: str, key: str | None = None) -> bytes:
    return multipart(path, {}, key, method)


async def exchange(reader, writer, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def load(port: int, clients: int, make_request, total: int, max_seconds: float, on_answer=None) -> dict:
    """``clients`` connections sending ``make_request(i)`` (i = 0..total-1) until ``total`` are
    answered or ``max_seconds`` pass. Returns latencies, statuses, wall seconds."""
    lat, statuses = [], {}
    counter = iter(range(total))
    deadline = time.perf_counter() + max_seconds

    async def client():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                req = make_request(i)
                t0 = time.perf_counter()
                status, body = await exchange(reader, writer, req)
                lat.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if on_answer is not None:
                    on_answer(i, status, body)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"lat": np.asarray(lat), "statuses": statuses, "wall": time.perf_counter() - start}


# ---------------------------------------------------------------- the service process


class Service:
    def __init__(self, model: Path, index: Path, *extra):
        args = [sys.executable, "-m", "facefuse.serve", "--model", str(model), "--index", str(index), "--port", "0",
                *map(str, extra)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        lines = []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "facefuse serve: http://" in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
        self.proc.kill()
        raise SystemExit("the service did not start:\n" + "".join(lines))

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the service process (all its threads) has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill9()


# ---------------------------------------------------------------- data, model, baselines


def pick_data(identities: int, seed: int = 0):
    lfw = shared_data_dir() / "lfw"
    crops_root, raw_root = lfw / "lfw-112", lfw / "raw-fold0"
    if not raw_root.is_dir():
        raise SystemExit(f"{raw_root}: not found (the shared LFW data)")
    people = [p.name for p in sorted(raw_root.iterdir()) if len(list((crops_root / p.name).glob("*.jpg"))) >= 5]
    chosen = people[:identities]
    gallery = {n: sorted((crops_root / n).glob("*.jpg"))[:4] for n in chosen}
    known = [p for n in chosen for p in sorted((crops_root / n).glob("*.jpg"))[4:]]
    rng = random.Random(seed)
    others = rng.sample([p for p in sorted(crops_root.iterdir()) if p.name not in chosen], 200)
    unknown = [sorted(p.glob("*.jpg"))[0] for p in others]
    photos = sorted(raw_root.glob("*/*.jpg"))
    return gallery, known + unknown, photos


def ensure_model(model: str | None, tmp: Path, origin: str | None = None) -> tuple[Path, str]:
    if model:
        return Path(model), origin or "given"
    run = REPO_ROOT / "runs" / "lfw"
    if (run / "model.pt").is_file():
        out = tmp / "model.onnx"
        subprocess.run([sys.executable, "-c", "from facefuse.cli import main; main()", "export", "--checkpoint",
                        str(run), "--onnx", str(out)], check=True, stdout=subprocess.DEVNULL)
        return out, "runs/lfw exported"
    raise SystemExit("no --model and no runs/lfw/model.pt to export")


def baselines(model_path: Path, index: Path, crops: list[bytes], repeats: int = 200) -> dict:
    from PIL import Image

    import facefuse

    model = facefuse.load_model(model_path)
    gallery = facefuse.open_gallery(index, model)
    s = model.meta.image_size
    x = np.random.default_rng(0).normal(size=(64, 3, s, s)).astype(np.float32)
    emb = model.embedder
    emb.embed_tensor(x)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - t0 < 3.0:
        emb.embed_tensor(x)
        n += 64
    ort_ips = n / (time.perf_counter() - t0)
    ort_cpu = (time.process_time() - c0) / n
    times = []
    c0 = time.process_time()
    for i in range(repeats):
        t = time.perf_counter()
        faces = model.faces(Image.open(io.BytesIO(crops[i % len(crops)])).convert("RGB"))
        gallery.search_vectors(model.embed_faces(faces), top_k=5)
        times.append(time.perf_counter() - t)
    search_cpu = (time.process_time() - c0) / repeats
    return {"ort_batch64_images_per_s": round(ort_ips, 1), "ort_batch64_cpu_ms_per_image": round(1e3 * ort_cpu, 3),
            "in_process_crop_search_cpu_ms": round(1e3 * search_cpu, 3),
            "in_process_crop_search_p50_ms": round(1e3 * float(np.median(times)), 3),
            "in_process_crop_search_p99_ms": round(1e3 * float(np.percentile(times, 99)), 3)}


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def summary(case: dict, r: dict, faces_per_request: float | None = None) -> dict:
    lat = r["lat"]
    ok = sum(v for k, v in r["statuses"].items() if 200 <= k < 300)
    row = {**case, "requests": int(lat.size), "ok": ok,
           "statuses": {str(k): v for k, v in sorted(r["statuses"].items())},
           "p50_ms": round(1e3 * float(np.median(lat)), 2) if lat.size else None,
           "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 2) if lat.size else None,
           "req_per_s": round(lat.size / r["wall"], 1), "wall_s": round(r["wall"], 2)}
    if faces_per_request is not None:
        row["faces_per_s"] = round(row["req_per_s"] * faces_per_request, 1)
    return row


# ---------------------------------------------------------------- the runs


def run_load_cases(svc: Service, mode: str, crops: list[bytes], photos: list[bytes], args) -> list[dict]:
    import json

    rows = []
    for kind, data, align in (("crop", crops, "none"), ("photo", photos, "landmarks")):
        if kind not in args.cases:
            continue
        reqs = [multipart(f"/v1/search?align={align}", {"photo": d}) for d in data]
        for clients in args.clients:
            faces = []
            total = args.requests if kind == "crop" else args.photo_requests

            def count(i, status, body):
                if status == 200:
                    faces.append(len(json.loads(body)["faces"]))

            asyncio.run(load(svc.port, clients, lambda i: reqs[i % len(reqs)], min(32, total), 30))  # warm-up
            before, cpu0, own0 = loadavg(), svc.cpu_seconds(), time.process_time()
            r = asyncio.run(load(svc.port, clients, lambda i: reqs[i % len(reqs)], total, args.max_seconds, count))
            cpu, own = svc.cpu_seconds() - cpu0, time.process_time() - own0
            fpr = float(np.mean(faces)) if faces else 0.0
            row = summary({"case": kind, "batching": mode, "clients": clients}, r, fpr)
            n = max(1, row["requests"])
            row.update(faces_per_request=round(fpr, 3), load_before=before, load_after=loadavg(),
                       service_cpu_ms_per_request=round(1e3 * cpu / n, 2),
                       service_cpu_share=round(cpu / r["wall"] / os.cpu_count(), 3),
                       client_cpu_ms_per_request=round(1e3 * own / n, 2))
            rows.append(row)
            print(f"  {kind:5s} {mode:3s} c={clients:2d}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                  f"{row['req_per_s']} req/s, {row.get('faces_per_s')} faces/s, {row['statuses']}, "
                  f"service CPU {row['service_cpu_ms_per_request']} ms/req ({row['service_cpu_share']:.0%} of the "
                  f"machine), client {row['client_cpu_ms_per_request']} ms/req, load {before}->{row['load_after']}",
                  flush=True)
    return rows


def run_mixed(svc: Service, crops: list[bytes], args) -> dict:
    import json

    rng = random.Random(1)
    plan = [rng.random() for _ in range(args.requests)]
    acked, removing, removed = set(), set(), set()
    enrolled_so_far = []

    def make(i):
        p = plan[i]
        if p < 0.15:
            name = f"mix{i}"
            return multipart(f"/v1/identities/{name}/faces?align=none", {"photo": crops[i % len(crops)]})
        if p < 0.20 and enrolled_so_far:
            name = enrolled_so_far.pop(0)
            removing.add(name)
            return simple("DELETE", f"/v1/identities/{name}")
        return multipart("/v1/search?align=none", {"photo": crops[i % len(crops)]})

    def seen(i, status, body):
        if status == 201:
            name = json.loads(body)["identity"]
            acked.add(name)
            enrolled_so_far.append(name)
        elif status == 200 and b'"removed"' in body:
            removed.add(json.loads(body)["identity"])

    before = loadavg()
    r = asyncio.run(load(svc.port, 32, make, args.requests, args.max_seconds * 2, seen))
    status, body = asyncio.run(_one(svc.port, simple("GET", "/v1/identities")))
    names = set(json.loads(body)["identities"])
    lost = sorted((acked - removing) - names)
    back = sorted(removed & names)
    row = summary({"case": "mixed", "batching": "on", "clients": 32}, r)
    row.update(enrolled=len(acked), removed=len(removed), lost_enrolments=len(lost), removed_but_present=len(back),
               load_before=before, load_after=loadavg(), five_xx=sum(v for k, v in r["statuses"].items() if k >= 500))
    print(f"  mixed: {row['statuses']}, enrolled {len(acked)}, removed {len(removed)}, lost {len(lost)}, "
          f"removed-but-present {len(back)}", flush=True)
    return row


async def _one(port: int, request: bytes):
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        return await exchange(reader, writer, request)
    finally:
        writer.close()


def run_fault(model: Path, index: Path, crops: list[bytes], tmp: Path, args) -> dict:
    import json

    from facefuse.serve.keys import add_key

    keys = tmp / "keys.json"
    write, read = add_key(keys, "bench-write", "write"), add_key(keys, "bench-read", "read")
    svc = Service(model, index, "--keys", keys, "--max-upload-bytes", 1_000_000, "--max-pixels", 4_000_000)
    acked, removing, removed, killed = set(), set(), set(), threading.Event()

    def make(i):
        if i % 4 == 3:
            name = f"storm{i - 1}"
            removing.add(name)
            return simple("DELETE", f"/v1/identities/{name}", write)
        return multipart(f"/v1/identities/storm{i}/faces?align=none", {"photo": crops[i % len(crops)]}, write)

    def seen(i, status, body):
        if status == 201:
            acked.add(json.loads(body)["identity"])
        elif status == 200:
            removed.add(json.loads(body)["identity"])
        if len(acked) >= args.kill_after and not killed.is_set():
            killed.set()
            svc.kill9()

    try:
        asyncio.run(load(svc.port, 8, make, 4 * args.kill_after, 60, seen))
    except (ConnectionError, asyncio.IncompleteReadError, OSError):
        pass  # the kill cuts the connections
    if not killed.is_set():
        svc.kill9()
    svc = Service(model, index, "--keys", keys, "--max-upload-bytes", 1_000_000, "--max-pixels", 4_000_000)
    try:
        status, body = asyncio.run(_one(svc.port, simple("GET", "/v1/identities", read)))
        names = set(json.loads(body)["identities"])
        lost = sorted((acked - removing) - names)
        back = sorted(removed & names)
        bad = {
            "malformed": multipart("/v1/search", {"photo": b"\x89PNG garbage" * 10}, read),
            "truncated": multipart("/v1/search", {"photo": crops[0][: len(crops[0]) // 3]}, read),
            "missing_field": multipart("/v1/search", {"picture": crops[0]}, read),
            "oversized": multipart("/v1/search", {"photo": b"\0" * 1_200_000}, read),
            "bomb_header": multipart("/v1/search", {"photo": _bomb_png(20_000, 20_000)}, read),
            "no_key": multipart("/v1/search", {"photo": crops[0]}),
            "wrong_key": multipart("/v1/search", {"photo": crops[0]}, read + "x"),
            "read_key_enrols": multipart("/v1/identities/x/faces?align=none", {"photo": crops[0]}, read),
            "bad_parameter": multipart("/v1/search?top_k=0&align=none", {"photo": crops[0]}, read),
        }
        answers = {}
        for name, req in bad.items():
            s, _ = asyncio.run(_one(svc.port, req))
            answers[name] = s
            after, _ = asyncio.run(_one(svc.port, multipart("/v1/search?align=none", {"photo": crops[1]}, read)))
            answers[name + "_then_search"] = after
    finally:
        svc.stop()
    row = {"case": "fault", "batching": "on", "clients": 8, "acknowledged_enrolments": len(acked),
           "acknowledged_removals": len(removed), "lost_enrolments": len(lost), "removed_but_present": len(back),
           "refusals": {k: v for k, v in answers.items() if not k.endswith("_then_search")},
           "search_after_each_refusal": sorted({v for k, v in answers.items() if k.endswith("_then_search")}),
           "all_refusals_4xx": all(400 <= v < 500 for k, v in answers.items() if not k.endswith("_then_search"))}
    print(f"  fault: acked {len(acked)}, removed {len(removed)}, lost {len(lost)}, removed-but-present {len(back)}, "
          f"refusals {row['refusals']}, searches after {row['search_after_each_refusal']}", flush=True)
    return row


def _bomb_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="ONNX model (default: runs/lfw exported to a temporary file)")
    ap.add_argument("--model-origin", help="where --model came from, recorded in the settings")
    ap.add_argument("--identities", type=int, default=10, help="gallery identities (4 crops each)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=600, help="requests per crop case (and the mixed run)")
    ap.add_argument("--photo-requests", type=int, default=200, help="requests per photo case")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="time bound of one case")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--kill-after", type=int, default=60, help="acknowledged enrolments before the kill -9")
    ap.add_argument("--cases", nargs="+", default=["crop", "photo"], choices=["crop", "photo"])
    ap.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"], help="micro-batching")
    ap.add_argument("--no-faults", action="store_true", help="skip the mixed and fault runs (no results file)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    args = ap.parse_args(argv)

    import facefuse

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        model, origin = ensure_model(args.model, tmp, args.model_origin)
        gallery, queries, photo_paths = pick_data(args.identities)
        src = tmp / "gallery"
        for name, paths in gallery.items():
            (src / name).mkdir(parents=True)
            for p in paths:
                shutil.copy(p, src / name / p.name)
        index = tmp / "index"
        facefuse.build_gallery(src, index, facefuse.load_model(model))
        crops = [p.read_bytes() for p in queries]
        photos = [p.read_bytes() for p in photo_paths[:200]]
        m = facefuse.load_model(model)
        print(f"model {model.name} ({origin}; {m.meta.backbone if hasattr(m.meta, 'backbone') else ''} "
              f"{m.meta.image_size}px, dim {m.dim}), gallery {sum(map(len, gallery.values()))} faces", flush=True)
        base = baselines(model, index, crops)
        print(f"baselines: {base}", flush=True)
        rows = []
        mixed = None
        for mode, extra in (("on", ["--max-batch", args.max_batch, "--max-wait-ms", args.max_wait_ms]),
                            ("off", ["--max-batch", 1])):
            if mode not in args.modes:
                continue
            svc = Service(model, index, "--threads", args.threads, *extra)
            try:
                rows += run_load_cases(svc, mode, crops, photos, args)
                if mode == "on" and not args.no_faults:
                    mixed = run_mixed(svc, crops, args)
            finally:
                svc.stop()
        if args.no_faults:
            print_table(rows, ["case", "batching", "clients", "p50_ms", "p99_ms", "req_per_s", "faces_per_s"])
            return
        rows.append(mixed)
        rows.append(run_fault(model, index, crops, tmp, args))
        rows.insert(0, {"case": "baseline", **base})
        print_table([r for r in rows if r["case"] in ("crop", "photo")],
                    ["case", "batching", "clients", "p50_ms", "p99_ms", "req_per_s", "faces_per_s", "load_before",
                     "load_after"])
        settings = {"model": origin, "model_file": model.name, "fingerprint": m.fingerprint,
                    "image_size": m.meta.image_size, "dim": m.dim, "gallery_faces": sum(map(len, gallery.values())),
                    "gallery_identities": len(gallery), "crop_queries": len(crops), "photo_queries": len(photos),
                    "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
                    "requests": args.requests, "photo_requests": args.photo_requests, "max_seconds": args.max_seconds,
                    "client": "asyncio keep-alive HTTP/1.1 in one process on the same machine", "cpus": os.cpu_count()}
        path = write_results("serve", device_name("cpu"), settings, rows,
                             **({"out_dir": args.out} if args.out else {}))
        print(f"wrote {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
