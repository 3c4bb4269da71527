"""File I/O at the edges: atomic writes, refusal to overwrite, safe checkpoint reads.

Every output goes through :func:`atomic_write` so that an interrupted run never leaves
a half-written file where the user expects a good one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import InputError


def _describe(p: Path) -> str:
    """What kind of non-regular thing ``p`` is, for a one-line refusal."""
    st = p.lstat()
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(st.st_mode):
            return name
    return "not a regular file"


def _same_file(a: Path, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(path: str | os.PathLike, force: bool,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output path before any work is done (fail fast, lose nothing).

    Refuses: an existing file without ``force``; anything that is not a regular file (a
    device such as /dev/null, a directory, a symlink, a pipe), even with ``force``; one of
    the command's ``inputs``, even with ``force``; a folder that does not exist, is not a
    folder, or where a file cannot actually be created (probed, so /proc or a read-only
    mount is caught here and not after the whole conversion).
    """
    p = Path(path)
    for inp in inputs:
        if _same_file(p, inp):
            raise InputError(f"{p}: is the input {inp}; choose another output path "
                             "({force} never replaces an input)", force="force=True")
    if os.path.lexists(p):
        if not stat.S_ISREG(p.lstat().st_mode):
            raise InputError(f"{p}: exists and is {_describe(p)}; hfbconvert only writes "
                             "regular files and never replaces anything else")
        if not force:
            raise InputError(f"{p}: already exists (pass {{force}} to overwrite)",
                             force="force=True")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{p}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{p}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{p}: cannot write in {parent} "
                         f"({exc.strerror or type(exc).__name__})") from None
    return p


class LockHeld(InputError):
    """Another run holds the output lock."""


class PickleRefused(InputError):
    """A checkpoint holds pickled code that safe loading refuses (``trust_pickle`` would
    load it)."""


@contextlib.contextmanager
def output_lock(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Hold an exclusive lock on each output path for the whole run.

    The lock is ``flock`` on a sibling ``.NAME.lock`` file, so two runs writing the same
    output (or its fine-tuning checkpoint) cannot interleave: the second stops at once
    with one line instead of silently losing one result. The lock file is removed on
    release; a run that finds its lock file replaced under it retries on the new one.
    """
    held: list[tuple[int, Path]] = []
    try:
        for path in sorted({Path(p).resolve() for p in paths}):
            held.append((_acquire(path), path))
        yield
    finally:
        for fd, path in reversed(held):
            with contextlib.suppress(OSError):
                os.unlink(_lock_name(path))
            os.close(fd)


def _lock_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _acquire(path: Path) -> int:
    lock = _lock_name(path)
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"{path}: cannot create its lock file {lock} "
                             f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(f"{path}: another hfbconvert run is writing it (lock {lock}); "
                           "wait for that run or choose another output") from None
        try:  # the holder before us may have unlinked the file we locked: retry
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise InputError(f"{path}: could not take its lock {lock}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path in the destination folder; move it to ``path`` on success.

    With ``overwrite`` False the move is a hard link, which fails if ``path`` appeared
    while the run worked (checked again at the rename, not only up front). Even with
    ``overwrite`` only a regular file is ever replaced: a device, folder or symlink that
    appeared at ``path`` is refused.
    """
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the mode a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        if os.path.lexists(dest) and not stat.S_ISREG(dest.lstat().st_mode):
            raise InputError(f"{dest}: is {_describe(dest)} now; not replaced")
        if overwrite:
            os.replace(tmp_path, dest)
        else:
            try:
                os.link(tmp_path, dest)
            except FileExistsError:
                raise InputError(f"{dest}: appeared while this run worked; not overwritten "
                                 "(pass {force} to overwrite)", force="force=True") from None
            tmp_path.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any],
                 overwrite: bool = True) -> Path:
    """Run ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path, overwrite) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite)


def save_torch(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    """``torch.save`` to bytes first so the file on disk is always complete and identical
    for identical content (no pickling of code: tensors and plain containers only)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue(), overwrite)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks (models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_torch(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """Load a checkpoint with ``weights_only=True`` unless the user explicitly trusts it.

    Every failure becomes an :class:`InputError` naming the file and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a checkpoint file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: not readable (permission denied)")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file, not a checkpoint")
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # torch raises many types for bad files
        msg = _load_error(p, exc, trust_pickle)
        if "{trust_pickle}" in msg:
            raise PickleRefused(msg, trust_pickle="trust_pickle=True") from None
        raise InputError(msg) from None


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # first byte of a protocol >= 2 pickle (legacy torch.save format)


def _first_line(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    return text.splitlines()[0].strip() if text else ""


def _load_error(p: Path, exc: Exception, trust_pickle: bool) -> str:
    """One line naming ``p`` and what is wrong with it, from whatever torch raised (the
    switch that loads pickles written as the placeholder ``{trust_pickle}``)."""
    full = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    low = full.lower()
    try:
        with open(p, "rb") as fh:
            head = fh.read(512)
    except OSError:
        head = b""
    is_zip = head.startswith(_ZIP_MAGIC)
    is_pickle = bool(head) and head[0] == _PICKLE_PROTO
    glob = re.search(r"unsupported global: global (\S+)", full, flags=re.IGNORECASE)
    if not trust_pickle and glob:
        return (f"{p}: contains pickled Python objects ({glob.group(1)}, e.g. a whole "
                "nn.Module); pass {trust_pickle} to load it (this runs code from the file)")
    if is_zip and ("zip" in low or "central directory" in low or "truncat" in low):
        return f"{p}: truncated or corrupt checkpoint (damaged zip archive)"
    if not is_zip and not is_pickle:
        if _looks_like_text(head):
            return f"{p}: a text file, not a PyTorch checkpoint"
        return f"{p}: not a PyTorch checkpoint (unrecognized contents, not a torch.save file)"
    if not trust_pickle and "weights only load failed" in low:
        return (f"{p}: pickled data that safe (weights-only) loading refuses; pass "
                "{trust_pickle} to load it if you trust the file (this runs code from it)")
    if isinstance(exc, EOFError) or "ran out of input" in low or "truncat" in low \
            or re.search(r"\beof\b", low):
        return f"{p}: truncated or corrupt checkpoint (data ends early)"
    detail = _first_line(full) or type(exc).__name__
    return f"{p}: not a readable PyTorch checkpoint ({type(exc).__name__}: {detail[:100]})"


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character may be cut at the end of the sample
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)
