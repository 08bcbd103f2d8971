"""Atomic file output: every file impasto writes goes through here, so no run leaves a partial file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import ImpastoError


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or a hard link."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def same_inputs(saved: object, now: object, cwd: str | None = None) -> bool:
    """Whether saved and given paths (one or a list) name the same files, so a run resumes by any path. A
    relative saved path is read from the saved run's folder (`cwd`) where that still holds it, else from
    here (a project moved as a whole)."""
    saved_list, now_list = (v if isinstance(v, list) else [v] for v in (saved, now))

    def same(s: object, n: object) -> bool:
        if s == n:
            return True
        if not (isinstance(s, str) and isinstance(n, str)):
            return False
        there = Path(cwd or ".") / s
        return same_file(there if there.exists() else Path(s), Path(n))

    return len(saved_list) == len(now_list) and all(map(same, saved_list, now_list))


def refuse_overwriting_inputs(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Stop before a run whose output path is one of its inputs."""
    out = Path(output)
    for inp in inputs:
        if same_file(out, Path(inp)):
            raise ImpastoError(f"output {out} is also an input; refusing to overwrite it")


def refuse_writing_inside(output: str | os.PathLike[str], folder: str | os.PathLike[str], what: str) -> None:
    """Stop before a run that would write into a folder it reads (`what` names the folder)."""
    out, src = Path(output), Path(folder)
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise ImpastoError(f"-o {out} is inside {what} {src}; write it elsewhere")


def check_writable(path: str | os.PathLike[str]) -> None:
    """Stop before a run whose output could not be written at its end: a directory in the file's place, a file
    in a folder's place, or a folder that cannot be written. Creates nothing that stays."""
    target = Path(path)
    if target.is_dir():
        raise ImpastoError(f"cannot write {target}: it is a directory")
    _check_can_write_in(target.parent if str(target.parent) else Path("."), target, target.name)


def check_writable_folder(path: str | os.PathLike[str]) -> None:
    """The same for a folder that outputs go into (it may exist already, or be made)."""
    _check_can_write_in(Path(path), Path(path), "impasto")  # no file of the folder's own name is made in it


def _check_can_write_in(folder: Path, target: Path, name: str) -> None:
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists: the rest gets made
        folder = folder.parent
    if not folder.is_dir():
        raise ImpastoError(f"cannot write {target}: {folder} is not a directory")
    try:
        # named as atomic_path names its temporary file: a name too long for it fails here, not after the run
        fd, probe = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise ImpastoError(f"cannot write {target}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImpastoError(f"cannot create directory {parent}: {e.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs get the usual permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without setting it where Linux allows (setting it races other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as e:
        raise ImpastoError(f"cannot write {path}: {e.strerror or e}") from None
    return Path(path)
