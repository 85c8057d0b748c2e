"""Writing files so that no reader ever sees half of one: a temporary file in the target's folder, fsynced, renamed
into place; outputs refused before any work when they cannot be written or would overwrite an input."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from modellego.errors import ModellegoError

_PROCESS_STARTED = time.time()


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, for provenance records."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_folder(target: Path, given: str) -> None:
    if given.endswith(("/", os.sep)):
        raise ModellegoError(f"output path {given} ends in a separator, so it names a folder; give a file name "
                             f"such as {given.rstrip('/' + os.sep)}/model.safetensors")
    if target.is_dir():
        raise ModellegoError(f"output path {target} is a folder; give a file name such as {target}/model.safetensors")
    if not target.parent.is_dir():
        blocking = next((folder for folder in target.parents if folder.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise ModellegoError(f"output folder {target.parent} cannot exist: {blocking} is a file; give a path in a "
                                 "folder")
        raise ModellegoError(f"output folder {target.parent} does not exist; create it first (mkdir -p {target.parent})")
    if not os.access(target.parent, os.W_OK):
        raise ModellegoError(f"output folder {target.parent} is not writable")


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Fail early (before any work) when `path` cannot be written: its folder must exist and take a new file,
    and it must not be one of the command's `inputs` (same file, also through links), which it would destroy."""
    target = Path(path)
    _check_folder(target, os.fspath(path))
    probe_folder(target.parent)
    for source in inputs:
        if source is not None and _same_file(target, Path(source)):
            raise ModellegoError(f"--out {target} is the input file {source}; writing it would destroy the input. "
                                 "Give another output name")
    return target


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return False


def _temp_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)-)?[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temp files a killed write to `target` left behind: ours carry the writer's pid (removed once that
    process is gone); older unnamed ones are removed when they predate this process."""
    removed = []
    pattern = _temp_pattern(target)
    try:
        candidates = list(target.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.match(candidate.name)
        if not match:
            continue
        try:
            if match.group(1) is not None:
                pid = int(match.group(1))
                if pid == os.getpid() or _alive(pid):
                    continue
            elif candidate.stat().st_mtime >= _PROCESS_STARTED:
                continue
            if candidate.is_dir() and not candidate.is_symlink():  # a folder write's (export --format folder)
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
        except OSError:
            continue
    return removed


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        handle = os.open(path, flags)
    except OSError:
        if directory:
            return  # some filesystems cannot open folders; the rename is still atomic
        raise
    try:
        os.fsync(handle)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(handle)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run `write(temp_path)`, fsync it, rename it onto `path` and fsync the folder, so a reader never sees a
    half-written file and a crash leaves the old file or the new one. A full disk is one clear error."""
    target = Path(path)
    _check_folder(target, os.fspath(path))
    remove_stale_temps(target)
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise _write_error(target, error) from None
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~current_umask())  # mkstemp makes owner-only files; a model file is as readable as any
        _fsync_path(temp)
        os.replace(temp, target)
        _fsync_path(target.parent, directory=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise _write_error(target, error) from None
        raise
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target


def current_umask() -> int:
    """The process's umask (read without changing it), for files and folders made with private modes."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(target: Path, error: OSError) -> ModellegoError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ModellegoError(f"no space left on the device to write {target}; free some space and run again "
                              "(nothing was written)")
    return ModellegoError(f"cannot write {target} ({error.strerror or error})")


def probe_folder(folder: Path, what: str = "output folder") -> None:
    """Prove `folder` (an existing directory) takes new files by creating and removing one: permission bits
    say nothing for root, read-only mounts or /proc."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".modellego-probe.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise ModellegoError(f"{what} {folder} is not writable ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)


def output_folder(path: str | os.PathLike, flag: str = "--out-dir") -> Path:
    """A folder for outputs, created if missing; refuses a file, a read-only place or a pseudo-filesystem."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ModellegoError(f"{flag} {folder} is a file, not a folder; give a folder name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModellegoError(f"{flag} {folder} cannot be created ({error.strerror or error})") from None
    probe_folder(folder, flag)
    return folder
