"""Checksummed, resumable dataset downloads, and the check of manually placed datasets.

* :func:`download_file`: one URL -> one file. Writes ``<file>.part`` and resumes it with an
  HTTP ``Range`` request after a dropped connection; retries transient failures (connection
  errors, timeouts, short bodies, HTTP 429/5xx) with exponential backoff, a bounded number
  of times; verifies the SHA-256 and only then renames the file into place. A mismatch
  deletes the download and raises :class:`ChecksumError` naming file, expected and actual.
* :func:`check_manual`: datasets behind a registration/licence (AMASS, 3DPW, Human3.6M,
  MPI-INF-3DHP, BEDLAM, PoseScript) are never fetched; this checks the expected files and,
  if some are missing, raises :class:`ManualDownloadRequired` saying exactly where to get
  them and where to put them.
* :func:`download_dataset`: the stage entry point (one dataset, its config section) that
  does either of the above and writes a JSON manifest (file -> sha256) for the workflow.

Credentials come only from environment variables (``auth: env``) or ``~/.netrc``
(``auth: netrc``). They travel in an ``Authorization`` header, never in the URL, and every
message that leaves this module goes through :func:`redact`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import netrc
import os
import re
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.auth import AuthBase, HTTPBasicAuth
from tqdm.auto import tqdm

from poserft.atomic import write_json
from poserft.data.converters.config import (
    DatasetSource, DatasetsConfig, source_section, url_file_name)

__all__ = ["DownloadError", "ChecksumError", "AuthError", "ManualDownloadRequired",
           "sha256_file", "redact", "resolve_credentials", "download_file", "extract_archive",
           "missing_files", "check_manual", "fetch_dataset", "download_dataset"]

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 16
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class DownloadError(RuntimeError):
    """A download failed (after retries, or for a reason retrying cannot fix)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the configured SHA-256 (the file was deleted)."""

    def __init__(self, file: str | os.PathLike, expected: str, actual: str, source: str = ""):
        self.file, self.expected, self.actual = str(file), expected, actual
        where = f" (downloaded from {source})" if source else ""
        super().__init__(
            f"{self.file}: SHA-256 mismatch{where}: expected {expected}, got {actual}. The "
            "file was deleted. A corrupted transfer: run the download again; a changed "
            "upstream file: check it and update the sha256 entry in the datasets config.")


class AuthError(DownloadError):
    """Credentials are missing, unreadable or refused by the server."""


class ManualDownloadRequired(DownloadError):
    """A registration-gated dataset is not (completely) in place; the message says how to fix it."""


# ----------------------------------------------------------------------------- small helpers

def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_AUTH_HEADER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(basic|bearer)?\s*[^\s'\",}]+")


def redact(text: Any, secrets: Iterable[str] = ()) -> str:
    """``str(text)`` with URL user-info, Authorization header values and ``secrets`` masked."""
    out = _USERINFO.sub(r"\g<scheme>***@", str(text))
    out = _AUTH_HEADER.sub(lambda m: m.group(1) + "***", out)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        out = out.replace(secret, "***")
    return out


def _url_without_userinfo(url: str) -> str:
    p = urlsplit(url)
    host = p.hostname or ""
    netloc = host + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


class _NoAuth(AuthBase):
    """Explicit 'no credentials': stops requests from silently reading ~/.netrc."""

    def __call__(self, r):
        return r


def resolve_credentials(source: DatasetSource, url: str, where: str = "datasets") -> tuple[str, str] | None:
    """(user, password) for ``url`` according to ``source.auth``, or None for 'none'.

    Raises :class:`AuthError` naming the environment variables / netrc file and host to
    set, never their values.
    """
    if source.auth == "none":
        return None
    if source.auth == "env":
        missing = [v for v in (source.username_env, source.password_env) if not os.environ.get(v)]
        if missing:
            raise AuthError(f"{where}: auth is 'env' but the environment variable(s) {missing} "
                            f"are not set; export them (user name in {source.username_env}, "
                            f"password/token in {source.password_env}) before downloading")
        return os.environ[source.username_env], os.environ[source.password_env]
    host = urlsplit(url).hostname or ""
    netrc_path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(netrc_path).authenticators(host)
    except FileNotFoundError:
        raise AuthError(f"{where}: auth is 'netrc' but {netrc_path} does not exist; add a line "
                        f"'machine {host} login <user> password <password>' (chmod 600)") from None
    except netrc.NetrcParseError as exc:
        # exc.msg may quote a token of the file: report only where it is.
        raise AuthError(f"{where}: could not parse {netrc_path} (line {exc.lineno}); "
                        "check its syntax and that it is chmod 600") from None
    if entry is None or not entry[0]:
        raise AuthError(f"{where}: no entry for host {host!r} in {netrc_path}; add "
                        f"'machine {host} login <user> password <password>'")
    return entry[0], entry[2] or ""


class _Retryable(Exception):
    """A failure worth retrying (after a backoff)."""


def _content_range_start(header: str | None) -> tuple[int | None, int | None]:
    """``'bytes 10-99/100'`` -> (10, 100); unknown parts are None."""
    m = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", header or "")
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


# ----------------------------------------------------------------------------- download

def download_file(url: str, dest: str | os.PathLike, *, sha256: str | None = None,
                  credentials: tuple[str, str] | None = None, retries: int = 5,
                  timeout: float = 60.0, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                  progress: bool = True, session: requests.Session | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> Path:
    """Download ``url`` to ``dest`` (resumable, retried, checksummed); return ``dest``.

    An existing ``dest`` whose hash matches ``sha256`` is kept (no request). Otherwise the
    bytes go to ``dest.part``; after a dropped connection the next attempt asks for the
    rest with ``Range: bytes=<size>-`` (a server answering 200 instead of 206 restarts the
    file). At most ``retries`` attempts, sleeping ``backoff_s * 2**k`` (capped) between.
    HTTP 401/403 raise :class:`AuthError` at once; other 4xx raise :class:`DownloadError`.
    """
    if retries < 1:
        raise ValueError(f"download_file: retries must be >= 1, got {retries}")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    secrets = list(credentials or ())
    shown_url = redact(_url_without_userinfo(url), secrets)
    if dest.exists():
        if sha256 is None or sha256_file(dest) == sha256:
            log.info("%s: already present, not downloading", dest)
            return dest
        log.warning("%s: present but its SHA-256 differs from the config; downloading again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    own_session = session is None
    session = session or requests.Session()
    auth: AuthBase = HTTPBasicAuth(*credentials) if credentials else _NoAuth()
    try:
        attempt = 0
        while True:
            attempt += 1
            try:
                _fetch_once(session, url, part, auth, timeout, progress, shown_url)
                break
            except (_Retryable, requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                reason = redact(exc, secrets)
                if attempt >= retries:
                    raise DownloadError(f"{shown_url}: giving up after {retries} attempts; last "
                                        f"error: {reason}") from None
                delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
                have = part.stat().st_size if part.exists() else 0
                log.warning("%s: attempt %d/%d failed (%s); %d bytes kept, retrying in %.1fs",
                            shown_url, attempt, retries, reason, have, delay)
                sleep(delay)
    finally:
        if own_session:
            session.close()

    actual = sha256_file(part)
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise ChecksumError(dest, sha256, actual, shown_url)
    os.replace(part, dest)
    if sha256 is None:
        sidecar = dest.with_name(dest.name + ".sha256")
        sidecar.write_text(f"{actual}  {dest.name}\n")
        log.warning("%s: no expected SHA-256 configured; got %s (written to %s) - pin it in "
                    "the datasets config", dest.name, actual, sidecar.name)
    return dest


def _fetch_once(session: requests.Session, url: str, part: Path, auth: AuthBase,
                timeout: float, progress: bool, shown_url: str) -> None:
    """One request: append to / (re)write ``part``; raise _Retryable on short bodies etc."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: byte counts, Range offsets and the hash all refer to the file's own bytes
    # (a gzip Content-Encoding would make the decoded size differ from Content-Length).
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, auth=auth, stream=True, timeout=timeout) as r:
        if r.status_code in (401, 403):
            raise AuthError(f"{shown_url}: HTTP {r.status_code} - the server refused the request "
                            "(missing or wrong credentials, or the licence was not accepted "
                            "for this account); see the dataset's auth/username_env/"
                            "password_env settings")
        if r.status_code == 416 and offset:
            part.unlink()  # our partial file is longer than the resource: start over
            raise _Retryable("HTTP 416 for the resumed range; restarting from byte 0")
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code}")
        if r.status_code not in (200, 206):
            raise DownloadError(f"{shown_url}: HTTP {r.status_code} (not retried)")
        total: int | None
        if r.status_code == 206:
            start, total = _content_range_start(r.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start}, expected {offset}; restarting")
            mode = "ab"
        else:  # full body: the server ignored (or we sent no) Range
            offset, mode = 0, "wb"
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B",
                                          unit_scale=True, desc=part.name[:-5],
                                          disable=not progress, leave=False) as bar:
            for chunk in r.iter_content(_CHUNK_BYTES):
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")


# ----------------------------------------------------------------------------- archives

def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(_ARCHIVE_SUFFIXES)


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Unpack a zip/tar archive into ``dest``; refuse members that would land outside it.

    Returns the extracted member paths.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    if str(archive).lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for name in names:
                target = (root / name).resolve()
                if target != root and root not in target.parents:
                    raise DownloadError(f"{archive}: member {name!r} would be written outside "
                                        f"{dest}; refusing to extract")
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            names = tf.getnames()
            try:
                tf.extractall(dest, filter="data")
            except tarfile.FilterError as exc:
                raise DownloadError(f"{archive}: unsafe member ({exc}); refusing to extract") from None
    return [dest / n for n in names]


# ----------------------------------------------------------------------------- datasets

def missing_files(root: str | os.PathLike, files: Iterable[str]) -> list[str]:
    """The entries of ``files`` (relative to ``root``) that do not exist."""
    root = Path(root)
    return [f for f in files if not (root / f).exists()]


def _homepage_help(source: DatasetSource) -> str:
    """The dataset-specific instructions (help text of the section's ``homepage`` field)."""
    for f in dataclasses.fields(source):
        if f.name == "homepage":
            return f.metadata.get("help", "")
    return ""


def check_manual(name: str, source: DatasetSource, root: str | os.PathLike) -> list[Path]:
    """Check a registration-gated dataset is in place; return its expected paths.

    Raises :class:`ManualDownloadRequired` listing the missing paths, where to get the
    dataset (``source.homepage``, the section's help) and the folder to put it in.
    """
    root = Path(root)
    missing = missing_files(root, source.files)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        message = (
            f"dataset '{name}' needs a manual download (registration/licence).\n"
            f"  Missing under {root.resolve()}: {shown}\n"
            f"  Get it from: {source.homepage or '(see the datasets.' + name + ' help)'}\n"
            f"  How: {_homepage_help(source)}\n"
            f"  Put it in:   {root.resolve()} (or set datasets.{name}.root to where it is), "
            f"so that these paths exist: {', '.join(source.files)}")
        log.error(message)
        raise ManualDownloadRequired(message)
    return [root / f for f in source.files]


def fetch_dataset(name: str, source: DatasetSource | Mapping[str, Any], root: str | os.PathLike, *,
                  retries: int = 5, timeout: float = 60.0, progress: bool = True,
                  **download_kw: Any) -> dict[str, str]:
    """Make dataset ``name`` available under ``root``; return ``{file: sha256}`` of the downloads.

    source: the ``datasets.<name>`` section (object or plain dict). Manual datasets:
    :func:`check_manual` only. Others: download every URL (with its configured hash and
    credentials), unpack archives when ``source.extract``, then check that
    ``source.files`` exist.
    """
    source = source_section(name, source)
    root = Path(root)
    if source.manual:
        check_manual(name, source, root)
        return {}
    hashes: dict[str, str] = {}
    for url in source.urls:
        file_name = url_file_name(url)
        creds = resolve_credentials(source, url, where=f"datasets.{name}")
        path = download_file(url, root / file_name, sha256=source.sha256.get(file_name),
                             credentials=creds, retries=retries, timeout=timeout,
                             progress=progress, **download_kw)
        hashes[file_name] = source.sha256.get(file_name) or sha256_file(path)
        stamp = root / f".{file_name}.extracted"
        if source.extract and is_archive(path) and not stamp.exists():
            extract_archive(path, root)
            stamp.write_text(hashes[file_name] + "\n")
    missing = missing_files(root, source.files)
    if missing:
        raise DownloadError(f"dataset '{name}': downloaded {list(hashes)} into {root} but "
                            f"these expected paths are still missing: {missing}; check "
                            f"datasets.{name}.files against the archive contents")
    return hashes


def download_dataset(name: str, cfg: DatasetsConfig, manifest_path: str | os.PathLike,
                     *, root: str | os.PathLike | None = None, tracker: Any = None,
                     progress: bool = True) -> dict[str, Any]:
    """Stage entry point: fetch/check dataset ``name`` and write a JSON manifest.

    cfg: the ``datasets`` section (DatasetsConfig). root: overrides the configured
    raw folder. The manifest ``{"dataset", "root", "manual", "files": {name: sha256}}`` is
    written atomically (it is the workflow's output of the download step).
    """
    cfg = DatasetsConfig.expect(cfg, "download_dataset: cfg")
    source = cfg.source(name)
    root = Path(root if root is not None else cfg.root_of(name))
    hashes = fetch_dataset(name, source, root, retries=cfg.download_retries,
                           timeout=cfg.download_timeout_s, progress=progress)
    manifest = {"dataset": name, "root": str(root), "manual": source.manual, "files": hashes,
                "expected": list(source.files)}
    write_json(manifest_path, manifest)
    if tracker is not None:
        # URLs carry no credentials (config.check forbids user-info); hashes are public.
        tracker.log_params({"dataset": name, "manual": source.manual, "n_files": len(hashes)})
        tracker.log_params({f"sha256.{k}": v for k, v in hashes.items()})
    return manifest
