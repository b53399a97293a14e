"""Fetch one file over HTTP(S) (or from a local mirror) with resume, retries and checksum verification.

    download("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
             Path("data/archives/ade20k/ADEChallengeData2016.zip"),
             checksum="219e1696abb36c8ba3a3afe7fb2f4b4606a897c7", algo="sha1")

The bytes go to ``<dest>.part``; an interrupted transfer is resumed from the size of that file with an HTTP
``Range`` request (a server that ignores ``Range`` and answers ``200`` restarts it from zero). Network errors,
truncated bodies and 5xx/408/429 answers are retried with exponential backoff; other 4xx answers are not.
Only after the digest matches is the file renamed to ``dest``; a mismatch removes the partial file (the bytes
are wrong, resuming them cannot help) and raises :class:`~pipeline.data.archive.ChecksumError`.

``url`` may also be ``file:///path`` or a plain local path: the file is copied, verified and renamed the same
way (the mirror / local-archive override for machines without direct internet access).

Standard library only (``urllib``); ``tqdm`` draws the progress bar.
"""

from __future__ import annotations

import http.client
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.files import ChecksumError, file_digest

CHUNK = 1 << 20
USER_AGENT = "pspnet-pipeline/1.0 (+urllib)"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadError(OSError):
    """A file could not be fetched (after the retries, or with an error that retrying cannot fix)."""


@dataclass(frozen=True)
class Release:
    """One published file: its name, where it is served, and its published digest (``None``: not published)."""

    name: str
    url: str
    algo: str = "sha256"
    digest: str | None = None


def _is_local(url: str) -> bool:
    scheme = urllib.parse.urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/"))  # C:\ on Windows


def _local_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(url)


def _finish(part: Path, dest: Path, url: str, checksum: str | None, algo: str) -> Path:
    """Verify ``part`` against ``checksum`` (removing it on a mismatch), then rename it to ``dest``."""
    if checksum is not None:
        actual = file_digest(part, algo)
        expected = checksum.strip().lower()
        if actual != expected:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{dest}: {algo} checksum mismatch for the file from {url}: expected {expected}, got {actual} "
                f"(the partial file {part.name} was removed; a corrupted transfer, a wrong mirror, or a new "
                "release: check the source and the configured checksum)"
            )
    os.replace(part, dest)
    return dest


def _content_range_start(value: str | None) -> int | None:
    """``"bytes 100-199/200"`` -> 100; anything else -> None."""
    if not value or not value.startswith("bytes "):
        return None
    first = value[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    """One HTTP request that appends to ``part`` (resuming from its size); raises on any short transfer."""
    offset = part.stat().st_size if part.exists() else 0
    with _open(url, part, offset, timeout=timeout) as response:
        offset, mode = _resume_point(url, response, offset)
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        received = _save_body(response, part, mode, offset, remaining, progress=progress)
        if remaining is not None and received < remaining:
            raise http.client.IncompleteRead(b"", remaining - received)


def _open(url: str, part: Path, offset: int, *, timeout: float) -> http.client.HTTPResponse:
    """Request ``url`` from byte ``offset`` on (a ``Range`` request when ``offset`` > 0).

    Raises:
        ConnectionResetError: the server answered 416 to a range request; ``part`` was removed, so that the
            retry starts from zero.
        urllib.error.HTTPError: any other error status.
    """
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The part is already complete (or longer than the file): start over from zero; the checksum
            # decides afterwards whether what we got is right.
            exc.close()
            part.unlink()
            raise ConnectionResetError(
                f"{url}: range {offset}- not satisfiable; restarting from zero"
            ) from exc
        raise


def _resume_point(url: str, response: http.client.HTTPResponse, offset: int) -> tuple[int, str]:
    """``(offset, file mode)`` the body is written at: ``(offset, "ab")`` for a 206, ``(0, "wb")`` for a 200.

    Raises:
        DownloadError: a 206 for another range than asked for, or a status other than 200/206.
    """
    status = response.status
    if status == 206:
        start = _content_range_start(response.headers.get("Content-Range"))
        if start != offset:
            raise DownloadError(
                f"{url}: asked for bytes {offset}- but the server sent {response.headers.get('Content-Range')!r}"
            )
        return offset, "ab"
    if status == 200:
        return 0, "wb"  # no Range request, or the server ignored it: restart
    raise DownloadError(f"{url}: unexpected HTTP status {status}")


def _save_body(
    response: http.client.HTTPResponse,
    part: Path,
    mode: str,
    offset: int,
    remaining: int | None,
    *,
    progress: bool,
) -> int:
    """Write the response body to ``part`` (opened with ``mode``) in ``CHUNK`` pieces; returns the bytes received.

    ``offset`` and ``remaining`` (``None``: unknown) size the progress bar.
    """
    bar = None
    if progress:
        from tqdm import tqdm

        total = offset + remaining if remaining is not None else None
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name)
    received = 0
    try:
        with open(part, mode) as f:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return received


def download(
    url: str,
    dest: Path,
    *,
    checksum: str | None = None,
    algo: str = "sha256",
    progress: bool = True,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60,
) -> Path:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming and retrying; verify; rename atomically.

    Args:
        url: ``http(s)://...``, ``file:///...`` or a local path (copied).
        dest: the final file. If it already exists and matches ``checksum`` (or no checksum is given) it is
            kept as it is; an existing file that does not match is fetched again.
        checksum: the expected hex digest; ``None`` skips verification.
        algo: ``"md5"``, ``"sha1"`` or ``"sha256"``.
        progress: draw a tqdm progress bar.
        retries: further attempts after the first failed one (network errors, truncated bodies, 5xx).
        backoff: seconds before the first retry; doubled for each further one.
        timeout: socket timeout of each request, in seconds.

    Returns:
        ``dest``.

    Raises:
        ChecksumError: the fetched bytes do not match ``checksum`` (the partial file is removed).
        DownloadError: the file could not be fetched (a 4xx answer, a missing local file, or every retry
            failed; a partial file is kept, and the next call resumes it).
    """
    dest = Path(dest)
    file_digest(os.devnull, algo)  # validates ``algo`` before any transfer
    if dest.is_file():
        if checksum is None or file_digest(dest, algo) == checksum.strip().lower():
            return dest
        dest.unlink()  # stale or corrupted: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if _is_local(url):
        source = _local_path(url)
        if not source.is_file():
            raise DownloadError(f"{source}: local file not found (source of {dest})")
        shutil.copyfile(source, part)
    else:
        _fetch_with_retries(
            url, part, dest, retries=retries, backoff=backoff, timeout=timeout, progress=progress
        )
    return _finish(part, dest, url, checksum, algo)


def _fetch_with_retries(
    url: str, part: Path, dest: Path, *, retries: int, backoff: float, timeout: float, progress: bool
) -> None:
    """Call :func:`_fetch_once` until it succeeds, at most ``retries + 1`` times, with exponential backoff.

    Raises:
        DownloadError: a status that retrying cannot fix (4xx other than 408/429), a ``DownloadError`` from
            the transfer, or every attempt failed (``part`` is kept for the next call to resume).
    """
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, part, timeout=timeout, progress=progress)
            return
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code not in _RETRY_STATUS:
                raise DownloadError(
                    f"{url}: HTTP {exc.code} {exc.reason} (not retried); target {dest}"
                ) from exc
            last = exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            if isinstance(exc, DownloadError):
                raise
            last = exc
    size = part.stat().st_size if part.exists() else 0
    raise DownloadError(
        f"{url}: failed after {retries + 1} attempt(s): {last!r}; {size} bytes kept in {part}, "
        "the next run resumes from there"
    ) from last
