"""Downloader against a local HTTP server (127.0.0.1, random free port, started per test).

The server serves in-memory files, can demand HTTP Basic auth, honours ``Range`` (or
ignores it), and can drop the connection mid-body a given number of times.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from poserft.configbase import ConfigError
from poserft.data.converters.config import (
    DatasetSource, DatasetsConfig, PoseScriptSource)
from poserft.data.download import (
    AuthError, ChecksumError, DownloadError, ManualDownloadRequired, check_manual,
    download_dataset, download_file, extract_archive, fetch_dataset, redact, sha256_file)

USER, PASSWORD = "alice", "s3cr3t-pa55word"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.log.append({"path": self.path, "range": self.headers.get("Range"),
                        "auth": self.headers.get("Authorization")})
        if srv.credentials is not None:
            token = base64.b64encode(f"{srv.credentials[0]}:{srv.credentials[1]}".encode()).decode()
            if self.headers.get("Authorization") != f"Basic {token}":
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = srv.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
        payload = body[start:]
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if srv.drops_left > 0:
            srv.drops_left -= 1
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True  # hang up mid-body
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.log, srv.credentials = {}, [], None
    srv.drops_left, srv.ignore_range = 0, False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ARCHIVE_FILES = {"release/a.txt": b"alpha\n", "release/sub/b.bin": bytes(range(256)) * 40}


def _source(server, name="data.tar.gz", sha=None, **kw) -> DatasetSource:
    body = server.files[f"/{name}"]
    sha = hashlib.sha256(body).hexdigest() if sha is None else sha
    return PoseScriptSource.from_dict({
        "manual": False, "urls": [f"{server.base}/{name}"], "sha256": {name: sha},
        "files": list(ARCHIVE_FILES), **kw}, where="datasets.posescript")


def _no_sleep(calls):
    return lambda s: calls.append(s)


def test_success_extracts_and_verifies(server, tmp_path):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    source = _source(server)
    hashes = fetch_dataset("posescript", source, tmp_path, progress=False)
    assert hashes == {"data.tar.gz": hashlib.sha256(server.files["/data.tar.gz"]).hexdigest()}
    for name, data in ARCHIVE_FILES.items():
        assert (tmp_path / name).read_bytes() == data
    assert not list(tmp_path.glob("*.part"))
    assert len(server.log) == 1 and server.log[0]["auth"] is None
    # second run (section given as a plain dict, as a rule passes it): file present with
    # the right hash and already extracted -> no request
    fetch_dataset("posescript", source.to_dict(), tmp_path, progress=False)
    assert len(server.log) == 1


def test_download_dataset_writes_manifest(server, tmp_path):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    cfg = DatasetsConfig.from_dict({"posescript": _source(server).to_dict()}, where="datasets")
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = download_dataset("posescript", cfg, manifest_path, root=tmp_path / "raw", progress=False)
    on_disk = json.loads(manifest_path.read_text())
    assert on_disk == manifest
    assert on_disk["files"]["data.tar.gz"] == sha256_file(tmp_path / "raw" / "data.tar.gz")


def test_wrong_checksum_deletes_and_names_file_and_hashes(server, tmp_path):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    wrong = "0" * 64
    source = _source(server, sha=wrong)
    with pytest.raises(ChecksumError) as err:
        fetch_dataset("posescript", source, tmp_path, progress=False)
    actual = hashlib.sha256(server.files["/data.tar.gz"]).hexdigest()
    msg = str(err.value)
    assert "data.tar.gz" in msg and wrong in msg and actual in msg
    assert err.value.expected == wrong and err.value.actual == actual
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part is left


def test_401_without_credentials(server, tmp_path):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    server.credentials = (USER, PASSWORD)
    with pytest.raises(AuthError, match="HTTP 401"):
        fetch_dataset("posescript", _source(server), tmp_path, progress=False)
    assert len(server.log) == 1  # not retried
    assert not (tmp_path / "data.tar.gz").exists()


def test_env_credentials_succeed_and_are_never_logged(server, tmp_path, monkeypatch, caplog):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    server.credentials = (USER, PASSWORD)
    server.drops_left = 1  # force a warning log line on the way
    monkeypatch.setenv("PS_USER", USER)
    monkeypatch.setenv("PS_PASS", PASSWORD)
    source = _source(server, auth="env", username_env="PS_USER", password_env="PS_PASS")
    calls = []
    with caplog.at_level(logging.DEBUG):
        fetch_dataset("posescript", source, tmp_path, progress=False, sleep=_no_sleep(calls))
    assert (tmp_path / "release/a.txt").read_bytes() == b"alpha\n"
    assert all(r["auth"] for r in server.log)
    assert caplog.records and PASSWORD not in caplog.text


def test_wrong_credentials_message_has_no_secret(server, tmp_path, monkeypatch):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    server.credentials = (USER, PASSWORD)
    monkeypatch.setenv("PS_USER", USER)
    monkeypatch.setenv("PS_PASS", "wrong-" + PASSWORD)
    source = _source(server, auth="env", username_env="PS_USER", password_env="PS_PASS")
    with pytest.raises(AuthError) as err:
        fetch_dataset("posescript", source, tmp_path, progress=False)
    assert PASSWORD not in str(err.value) and "401" in str(err.value)


def test_missing_env_credentials_name_the_variables(server, tmp_path, monkeypatch):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    monkeypatch.delenv("PS_USER", raising=False)
    monkeypatch.delenv("PS_PASS", raising=False)
    source = _source(server, auth="env", username_env="PS_USER", password_env="PS_PASS")
    with pytest.raises(AuthError, match="PS_USER.*PS_PASS"):
        fetch_dataset("posescript", source, tmp_path, progress=False)
    assert server.log == []


def test_netrc_credentials(server, tmp_path, monkeypatch):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    server.credentials = (USER, PASSWORD)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    fetch_dataset("posescript", _source(server, auth="netrc"), tmp_path / "raw", progress=False)
    assert (tmp_path / "raw/release/sub/b.bin").read_bytes() == ARCHIVE_FILES["release/sub/b.bin"]
    # a host without an entry: clear error naming host and file, no request
    netrc_file.write_text(f"machine example.org login {USER} password {PASSWORD}\n")
    server.log.clear()
    with pytest.raises(AuthError) as err:
        fetch_dataset("posescript", _source(server, auth="netrc"), tmp_path / "raw2", progress=False)
    assert "127.0.0.1" in str(err.value) and str(netrc_file) in str(err.value)
    assert PASSWORD not in str(err.value) and server.log == []


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    body = bytes(range(256)) * 2048  # 512 KiB: the first attempt delivers 256 KiB
    server.files["/big.bin"] = body
    server.drops_left = 1
    sleeps = []
    dest = download_file(f"{server.base}/big.bin", tmp_path / "big.bin",
                         sha256=hashlib.sha256(body).hexdigest(), retries=3, timeout=5,
                         backoff_s=0.5, progress=False, sleep=_no_sleep(sleeps))
    assert dest.read_bytes() == body
    first, second = server.log
    assert first["range"] is None
    # resumed from the bytes kept (whole chunks of what arrived before the hang-up)
    resumed_at = int(second["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(body) // 2
    assert sleeps == [0.5]
    assert not (tmp_path / "big.bin.part").exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    body = b"0123456789" * 500
    server.files["/x.bin"] = body
    server.drops_left, server.ignore_range = 1, True
    dest = download_file(f"{server.base}/x.bin", tmp_path / "x.bin",
                         sha256=hashlib.sha256(body).hexdigest(), retries=3, timeout=5,
                         progress=False, sleep=_no_sleep([]))
    assert dest.read_bytes() == body and len(server.log) == 2


def test_retries_are_bounded(server, tmp_path):
    server.files["/x.bin"] = b"z" * 4000
    server.drops_left = 100
    sleeps = []
    with pytest.raises(DownloadError, match="giving up after 3 attempts"):
        download_file(f"{server.base}/x.bin", tmp_path / "x.bin", retries=3, timeout=5,
                      backoff_s=1.0, max_backoff_s=1.5, progress=False, sleep=_no_sleep(sleeps))
    assert len(server.log) == 3 and sleeps == [1.0, 1.5]
    assert not (tmp_path / "x.bin").exists()


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.base}/nope.bin", tmp_path / "nope.bin", retries=5, timeout=5,
                      progress=False, sleep=_no_sleep([]))
    assert len(server.log) == 1


def test_unpinned_download_writes_sidecar_hash(server, tmp_path):
    server.files["/f.json"] = b'{"a": 1}'
    dest = download_file(f"{server.base}/f.json", tmp_path / "f.json", timeout=5, progress=False)
    expected = hashlib.sha256(b'{"a": 1}').hexdigest()
    assert (tmp_path / "f.json.sha256").read_text().split()[0] == expected == sha256_file(dest)


def test_manual_dataset_check_says_where_to_get_and_put(tmp_path):
    source = PoseScriptSource()
    with pytest.raises(ManualDownloadRequired) as err:
        check_manual("posescript", source, tmp_path)
    msg = str(err.value)
    assert "posescript_release_v2.zip" in msg          # where to get it
    assert str(tmp_path.resolve()) in msg               # where to put it
    assert "train_ids_100k.json" in msg                 # what is missing
    for f in source.files:
        (tmp_path / f).write_text("{}")
    assert check_manual("posescript", source, tmp_path) == [tmp_path / f for f in source.files]


def test_fetch_manual_dataset_makes_no_request(server, tmp_path):
    source = PoseScriptSource.from_dict({"urls": [f"{server.base}/x.zip"]})
    with pytest.raises(ManualDownloadRequired):
        fetch_dataset("posescript", source, tmp_path)
    assert server.log == []


def test_redact_masks_userinfo_headers_and_secrets():
    text = ("GET https://bob:hunter2@example.org/a?x=1 failed; headers {'Authorization': "
            "'Basic Ym9iOmh1bnRlcjI='} token=abc123")
    out = redact(text, secrets=["abc123"])
    assert "hunter2" not in out and "Ym9iOmh1bnRlcjI=" not in out and "abc123" not in out
    assert "https://***@example.org/a?x=1" in out


def test_zip_member_outside_root_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("override, key", [
    ({"urls": ["https://u:p@example.org/a.zip"]}, "urls[0]"),
    ({"urls": ["ftp://example.org/a.zip"]}, "urls[0]"),
    ({"urls": ["https://example.org/a.zip"], "sha256": {"a.zip": "XYZ"}}, "sha256.a.zip"),
    ({"urls": ["https://example.org/a.zip"], "sha256": {"b.zip": "0" * 64}}, "sha256.b.zip"),
    ({"auth": "env"}, "username_env"),
])
def test_source_config_invariants(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        PoseScriptSource.from_dict(override, where="datasets.posescript")


def test_datasets_config_defaults_and_partial_override():
    cfg = DatasetsConfig.from_dict({"amass": {"root": "/scratch/amass"}}, where="datasets")
    assert cfg.enabled == []
    assert cfg.amass.root == "/scratch/amass" and cfg.amass.manual
    assert "HumanEva" in cfg.amass.splits["val"]       # dataset-specific default kept
    assert cfg.root_of("pw3d") == "raw/pw3d"
    assert list(DatasetsConfig().source("h36m").splits) == ["train", "test"]
    with pytest.raises(ConfigError, match=r"datasets\.enabled\[0\]"):
        DatasetsConfig.from_dict({"enabled": ["imagenet"]}, where="datasets")


def test_download_dataset_tracks_hashes_but_no_credentials(server, tmp_path, monkeypatch):
    server.files["/data.tar.gz"] = _tar_gz(ARCHIVE_FILES)
    server.credentials = (USER, PASSWORD)
    monkeypatch.setenv("PS_USER", USER)
    monkeypatch.setenv("PS_PASS", PASSWORD)
    source = _source(server, auth="env", username_env="PS_USER", password_env="PS_PASS")
    logged = {}

    class Tracker:
        def log_params(self, d):
            logged.update(d)

    cfg = DatasetsConfig.from_dict({"posescript": source.to_dict()}, where="datasets")
    download_dataset("posescript", cfg, tmp_path / "m.json",
                     root=tmp_path / "raw", tracker=Tracker(), progress=False)
    assert logged["sha256.data.tar.gz"] == source.sha256["data.tar.gz"]
    blob = json.dumps(logged) + (tmp_path / "m.json").read_text()
    assert PASSWORD not in blob and USER not in blob
