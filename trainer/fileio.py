"""Atomic writes and content hashes for every file the project produces (checkpoints, EWC files, token stores)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success rename it over `final`, on failure delete it.

    A crash or exception inside the block leaves any previous `final` untouched and no partial file under its
    name. Directories are replaced by renaming the old one aside first (two renames), so a reader sees either the
    old or the new directory complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    # mkdtemp/mkstemp create private (0700/0600) entries; the result should get the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        os.chmod(tmp, 0o777 & ~umask)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        if is_dir:
            for root, _, files in os.walk(tmp):
                for f in files:
                    with open(os.path.join(root, f), "rb") as fh:
                        os.fsync(fh.fileno())
            if final.exists():
                old = final.parent / f".{final.name}.old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_sha256(files: Sequence[str | os.PathLike]) -> str:
    """The sha256 of one file; of several, the sha256 over their sorted (name, sha256) lines."""
    paths = [Path(f) for f in files]
    if len(paths) == 1:
        return sha256_file(paths[0])
    h = hashlib.sha256()
    for f in sorted(paths, key=lambda p: p.name):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()
