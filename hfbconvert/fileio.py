"""File I/O at the edges: atomic writes, refusal to overwrite, safe checkpoint reads.

Every output goes through :func:`atomic_write` so that an interrupted run never leaves
a half-written file where the user expects a good one.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import InputError


def check_output_path(path: str | os.PathLike, force: bool) -> Path:
    """Validate an output path before any work is done (fail fast, lose nothing)."""
    p = Path(path)
    if p.exists() and not force:
        raise InputError(f"{p}: already exists (pass --force to overwrite)")
    if p.exists() and p.is_dir():
        raise InputError(f"{p}: is a directory, expected a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{p}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{p}: output folder {parent} is not writable")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the destination folder; rename it over ``path`` on success."""
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
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Run ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` to bytes first so the file on disk is always complete and identical
    for identical content (no pickling of code: tensors and plain containers only)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


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
        raise InputError(_load_error(p, exc, trust_pickle)) from None


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # first byte of a protocol >= 2 pickle (legacy torch.save format)


def _first_line(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    return text.splitlines()[0].strip() if text else ""


def _load_error(p: Path, exc: Exception, trust_pickle: bool) -> str:
    """One line naming ``p`` and what is wrong with it, from whatever torch raised."""
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
                "nn.Module); pass --trust-pickle to load it (this runs code from the file)")
    if is_zip and ("zip" in low or "central directory" in low or "truncat" in low):
        return f"{p}: truncated or corrupt checkpoint (damaged zip archive)"
    if not is_zip and not is_pickle:
        if _looks_like_text(head):
            return f"{p}: a text file, not a PyTorch checkpoint"
        return f"{p}: not a PyTorch checkpoint (unrecognized contents, not a torch.save file)"
    if not trust_pickle and "weights only load failed" in low:
        return (f"{p}: pickled data that safe (weights-only) loading refuses; pass "
                "--trust-pickle to load it if you trust the file (this runs code from it)")
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
