"""Atomic writes, output guards and content hashes for every file the project produces (checkpoints, EWC files,
token stores, exports, results).

Every command that writes checks its output first with `check_output`: it never writes over one of its own inputs
(even with --overwrite), never replaces an existing non-empty file or directory without --overwrite, and errors
name the path the user gave (never a temporary one).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from trainer.errors import UserError


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


def _same(a: Path, b: Path) -> bool:
    """The same file or directory, also through links (by path where the file system cannot say)."""
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                 directory: bool = False, owned_marker: str | None = None, owned_kind: str = "this command's output",
                 flag: str = "--out") -> Path:
    """Refuse an output that would lose a user's files; returns `out` as a Path. Call it before any side effect.

    - an input is never written over: `out` may not be an input, nor a directory holding one (replacing it would
      delete the input), with or without `overwrite`;
    - an existing non-empty output (a file, or a directory with entries) is replaced only with `overwrite`;
    - a file output may not be a directory, and a directory output may not be a file;
    - `owned_marker`: with `overwrite`, an existing directory is replaced only if it holds this file (it looks like
      this command's own output, `owned_kind`: a token store's manifest, a model's config.json), never an
      arbitrary folder.
    """
    out = Path(out)
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if _same(out, source):
            raise UserError(f"{flag} {out} is also an input ({source}); refusing to write over it: choose another "
                            f"{flag}")
        if source.resolve().is_relative_to(out.resolve()):
            raise UserError(f"{flag} {out} holds the input {source}; replacing it would delete that input: choose "
                            f"another {flag}")
    if not out.exists():
        return out
    if directory and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a directory; choose another {flag}")
    if not directory and out.is_dir():
        raise UserError(f"{flag} {out} is a directory; give the path of the file to write")
    empty = not any(out.iterdir()) if out.is_dir() else out.stat().st_size == 0
    if empty:
        return out
    if not overwrite:
        raise UserError(f"{flag} {out} already exists; pass --overwrite to replace it, or choose another {flag}")
    if directory and owned_marker is not None and not (out / owned_marker).exists():
        raise UserError(f"{flag} {out} exists and is not {owned_kind} (no {owned_marker}); "
                        f"refusing to replace it even with --overwrite: choose another {flag}")
    return out


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success rename it over `final`, on failure delete it.

    A crash or exception inside the block leaves any previous `final` untouched and no partial file under its
    name. Directories are replaced by renaming the old one aside first (two renames), so a reader sees either the
    old or the new directory complete.
    """
    final = Path(final)
    if final.is_dir() != is_dir and final.exists():
        raise UserError(f"{final} is a directory; give the path of the file to write" if not is_dir
                        else f"{final} exists and is not a directory")
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
