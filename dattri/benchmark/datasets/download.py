"""Download and checksum helpers for the benchmark datasets.

Nothing here is called at import time; the dataset builders only download when the
caller asks for it (``download=True``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "ChecksumError",
    "download_file",
    "extract_tar",
    "file_digest",
    "get_dataset_dir",
    "verify_checksum",
]

_CHUNK = 1 << 20
_USER_AGENT = "dattri-dataset-downloader"


class ChecksumError(ValueError):
    """A file's size or digest does not match the published value."""


def get_dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """Return the cache folder of one dataset (not created).

    Args:
        name: Dataset folder name, e.g. ``"mnist"``.
        root: Cache root. Defaults to ``$DATTRI_HOME/datasets`` where
            ``DATTRI_HOME`` defaults to ``~/.dattri``.

    Returns:
        ``Path`` of ``<root>/<name>`` with ``~`` expanded.
    """
    if root is None:
        home = Path(os.environ.get("DATTRI_HOME", "~/.dattri")).expanduser()
        return home / "datasets" / name
    return Path(root).expanduser() / name


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks.

    Args:
        path: File to hash.
        algorithm: Any name accepted by ``hashlib.new`` (``"sha256"``, ``"md5"``).

    Returns:
        Lower-case hexadecimal digest.
    """
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(
    path: str | os.PathLike,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
) -> None:
    """Check a file against its published size and digests.

    Every check whose expected value is given is performed; passing none of them
    only checks that the file exists.

    Args:
        path: File to check.
        sha256: Expected SHA-256 hex digest.
        md5: Expected MD5 hex digest.
        size: Expected size in bytes.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ChecksumError: If a size or digest differs; the message names the file,
            the expected and actual values and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path} does not exist."
        raise FileNotFoundError(msg)
    fix = "delete it and download it again (download=True)"
    if size is not None and path.stat().st_size != size:
        msg = (
            f"{path} has {path.stat().st_size} bytes, expected {size}: the file is "
            f"truncated or not the official one; {fix}."
        )
        raise ChecksumError(msg)
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is None:
            continue
        actual = file_digest(path, algorithm)
        if actual != expected.lower():
            msg = (
                f"{algorithm} of {path} is {actual}, expected {expected}: the file is "
                f"corrupt or not the official one; {fix}."
            )
            raise ChecksumError(msg)


def download_file(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    verbose: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download a file, trying mirrors in order, and verify it before keeping it.

    The data is streamed to ``<dest>.part`` and renamed to ``dest`` only after the
    checks pass, so a failed or interrupted download never leaves a file that
    looks complete. An existing ``dest`` that passes the checks is kept as is.

    Args:
        urls: One URL or several mirror URLs of the same file (any scheme
            ``urllib`` understands, including ``file://``).
        dest: Destination file path; parent folders are created.
        sha256: Expected SHA-256 hex digest, if known.
        md5: Expected MD5 hex digest, if known.
        size: Expected size in bytes, if known.
        verbose: Show a tqdm progress bar.
        timeout: Socket timeout in seconds for each attempt.

    Returns:
        The path of the verified file.

    Raises:
        ValueError: If ``urls`` is empty.
        ChecksumError: If the downloaded data fails verification on every mirror.
        OSError: If no mirror could be reached; the message lists each error.
    """
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        msg = "`urls` must name at least one URL."
        raise ValueError(msg)
    dest = Path(dest).expanduser()
    if dest.is_file():
        try:
            verify_checksum(dest, sha256=sha256, md5=md5, size=size)
        except ChecksumError:
            dest.unlink()
        else:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors: list[str] = []
    checksum_failure: ChecksumError | None = None
    for url in url_list:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = response.headers.get("Content-Length")
                with (
                    part.open("wb") as out,
                    tqdm(
                        total=int(total) if total else None,
                        unit="B",
                        unit_scale=True,
                        desc=dest.name,
                        disable=not verbose,
                    ) as bar,
                ):
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        out.write(block)
                        bar.update(len(block))
            verify_checksum(part, sha256=sha256, md5=md5, size=size)
        except ChecksumError as exc:
            checksum_failure = exc
            errors.append(f"{url}: {exc}")
            part.unlink(missing_ok=True)
            continue
        except OSError as exc:  # URLError and HTTPError are OSErrors
            errors.append(f"{url}: {exc}")
            part.unlink(missing_ok=True)
            continue
        part.replace(dest)
        return dest
    if checksum_failure is not None and len(errors) == 1:
        raise checksum_failure
    joined = "\n  ".join(errors)
    msg = f"Could not download {dest.name}; tried:\n  {joined}"
    if checksum_failure is not None:
        raise ChecksumError(msg)
    raise OSError(msg)


def extract_zip(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Test a zip archive's checksums and extract it safely into ``dest_dir``.

    Args:
        archive: The ``.zip`` file.
        dest_dir: Folder to extract into (created if missing).

    Returns:
        ``dest_dir`` as a ``Path``.

    Raises:
        zipfile.BadZipFile: If a member fails its CRC check (a corrupt download).
        ValueError: If a member would be written outside ``dest_dir``.
    """
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = dest_dir.resolve()
    with zipfile.ZipFile(archive) as zf:
        bad = zf.testzip()
        if bad is not None:
            msg = f"{archive}: member {bad!r} is corrupt; delete it and download it again."
            raise zipfile.BadZipFile(msg)
        for name in zf.namelist():
            target = (root / name).resolve()
            if target != root and root not in target.parents:
                msg = f"Refusing to extract {name!r} of {archive} outside {dest_dir}."
                raise ValueError(msg)
        zf.extractall(root)
    return dest_dir


def extract_tar(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Extract a (possibly compressed) tar archive safely into ``dest_dir``.

    Members with absolute paths, ``..`` components or links are refused.

    Args:
        archive: The ``.tar``/``.tar.gz`` file.
        dest_dir: Folder to extract into (created if missing).

    Returns:
        ``dest_dir`` as a ``Path``.

    Raises:
        ValueError: If a member would be written outside ``dest_dir`` or is a link.
    """
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = dest_dir.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            target = (root / member.name).resolve()
            if root != target and root not in target.parents:
                msg = f"Refusing to extract {member.name!r} outside {dest_dir}."
                raise ValueError(msg)
            if member.issym() or member.islnk() or member.isdev():
                msg = f"Refusing to extract link or device member {member.name!r}."
                raise ValueError(msg)
        for member in members:
            target = root / member.name
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:  # pragma: no cover - only regular files reach here
                continue
            with src, target.open("wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    return dest_dir
