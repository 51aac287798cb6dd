"""Write a pruned model as a Hugging Face folder (safetensors) with a JSON sidecar describing how it was made.

Nothing of the user's is ever removed: a target folder must be new, empty, or one PruneScope wrote (it has the
sidecar, which lists the files it wrote), and the last is replaced only with `overwrite`. Every write goes into a
temporary sibling `.NAME.tmp<PID>` that is swapped in at the end (the old folder is renamed aside to
`.NAME.old<PID>`, the new one renamed in, then the old one removed), so a crash, a full disk or a kill leaves the
previous folder loadable. Such leftovers of a process that is no longer alive are removed on the next save (an
aside folder whose target is missing is put back instead)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

SIDECAR = "prunescope.json"
OWN_FILES = "files"  # the sidecar's list of the files PruneScope wrote into the folder
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
NO_PERMISSION = (errno.EACCES, errno.EPERM)


def check_target(folder: str | os.PathLike, overwrite: bool = False, *, owned: bool = False) -> Path:
    """The resolved target folder if a save may write it, else a one-line ValueError that says what to do.

    Allowed: a new folder (its nearest existing parent writable), an empty folder, and, with `overwrite`, a folder
    PruneScope wrote that holds only files PruneScope wrote. `owned`: the folder is PruneScope's own (a store
    artifact), treated as written by PruneScope even when its sidecar is damaged or missing."""
    target = Path(folder).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder: give a folder to save into")
    if target.is_dir():
        try:
            entries = sorted(p.name for p in target.iterdir())
        except OSError as err:
            raise ValueError(f"cannot read {target}: {err.strerror or err}: pick another folder") from None
        if entries:
            if not owned and not (target / SIDECAR).is_file():
                raise ValueError(f"{target} is not empty and was not written by PruneScope (it has no {SIDECAR}): "
                                 f"pick an empty or new folder (nothing in it was touched)")
            if not overwrite:
                raise ValueError(f"{target} holds a model PruneScope saved earlier: add --overwrite (overwrite=True "
                                 f"in Python) to replace it, or pick an empty or new folder")
            listed = None if owned else _own_files(target)
            extra = [name for name in entries if listed is not None and name not in listed]
            if extra:
                shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
                raise ValueError(f"{target} also holds files PruneScope did not write ({shown}): move them out or "
                                 f"pick an empty or new folder (nothing in it was touched)")
    anchor = target.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ValueError(f"cannot create {target}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(anchor) else "permission denied"
        raise ValueError(f"cannot write to {target}: {anchor} is not writable ({reason}): pick another folder")
    return target


def save_pruned(model, tokenizer, folder: str | os.PathLike, sidecar: dict, overwrite: bool = False, *,
                owned: bool = False) -> Path:
    """Save the model, its tokenizer and the sidecar into `folder` (see `check_target` for which folders may be
    written and `write_folder` for how); returns the folder."""

    def fill(tmp: Path) -> None:
        from compression.residency import is_dispatched

        # a model accelerate placed is gathered one shard at a time in CPU memory: small shards keep that small
        model.save_pretrained(tmp, safe_serialization=True, **({"max_shard_size": "500MB"} if is_dispatched(model) else {}))
        tokenizer.save_pretrained(tmp)
        written = sorted({p.name for p in tmp.iterdir()} | {SIDECAR})
        (tmp / SIDECAR).write_text(json.dumps({**sidecar, OWN_FILES: written}, indent=1, default=str))

    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    return write_folder(folder, fill, overwrite=overwrite, owned=owned, needed_bytes=needed)


def write_folder(folder: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False,
                 owned: bool = False, needed_bytes: int = 0, what: str = "the pruned model") -> Path:
    """Check the target, call `fill(tmp)` on an empty temporary sibling, then swap it in. A full disk or a
    permission error becomes one ValueError line; on any failure the temporary folder is removed and the previous
    folder stays as it was."""
    clean_leftovers(Path(folder).expanduser().resolve())  # first, so a model put back is seen by the check
    target = check_target(folder, overwrite, owned=owned)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
        fill(tmp)
        _fsync_folder(tmp)
        check_target(target, overwrite, owned=owned)  # still what was checked before the (long) write
        _swap_in(tmp, target)
    except BaseException as err:
        _discard(tmp)
        error = write_error(err, target, what, needed_bytes)
        if error is not None:
            raise error from None
        raise
    return target


def write_text(path: str | os.PathLike, text: str, what: str | None = None) -> Path:
    """Write a file atomically: a temporary sibling `.NAME.tmp<PID>`, fsync, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    data = text.encode("utf-8")
    try:
        clean_leftovers(path)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        _discard(tmp)
        error = write_error(err, path, what or path.name, len(data))
        if error is not None:
            raise error from None
        raise
    return path


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.tmp<PID>` / `.NAME.old<PID>` siblings of `target` whose process is no longer alive; an aside
    `.old` folder whose target is missing (a swap killed between its two renames) is renamed back instead. Nothing
    else is touched. Returns what was removed or restored."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)([0-9]+)")
    done = []
    try:
        siblings = sorted(target.parent.iterdir())
    except OSError:
        return done
    for entry in siblings:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or _alive(int(match[2])):
            continue
        try:
            if match[1] == "old" and entry.is_dir() and not os.path.lexists(target):
                entry.rename(target)
            else:
                _remove(entry)
            done.append(entry)
        except OSError:
            pass
    return done


def write_error(err: BaseException, target: Path, what: str, needed_bytes: int = 0) -> ValueError | None:
    """One line for a full disk or a permission error (also when wrapped, e.g. by safetensors), else None."""
    code = _errno(err)
    if code in NO_SPACE:
        free = _free_mb(target)
        mb = needed_bytes / 2**20
        needs = f"needs about {mb:.1f} MB" if 0 < mb < 10 else f"needs about {mb:.0f} MB" if mb else ""
        detail = ", ".join(x for x in (needs, free) if x)
        detail = f" ({detail})" if detail else ""
        return ValueError(f"cannot write {what} to {target}: no space left on device{detail}; free some space or "
                          f"pick another folder (the folder was left as it was)")
    if code in NO_PERMISSION or code == errno.EROFS:
        reason = "read-only file system" if code == errno.EROFS else "permission denied"
        return ValueError(f"cannot write {what} to {target}: {reason}; pick another folder (the folder was left as "
                          f"it was)")
    return None


def read_sidecar(folder: str | os.PathLike) -> dict | None:
    """The sidecar of a pruned folder, or None for a model PruneScope did not write."""
    path = Path(folder) / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else None


def _own_files(folder: Path) -> set[str] | None:
    """The files the sidecar says PruneScope wrote (None: an older or unreadable sidecar without the list)."""
    try:
        listed = (read_sidecar(folder) or {}).get(OWN_FILES)
    except (OSError, ValueError, AttributeError):
        return None
    return set(listed) | {SIDECAR} if isinstance(listed, list) else None


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished temporary folder into place. An empty target is replaced by the rename itself (which
    refuses a non-empty one); an existing model is renamed aside first and put back if the rename in fails."""
    if not target.is_dir() or not any(target.iterdir()):
        os.rename(tmp, target)
    else:
        aside = target.with_name(f".{target.name}.old{os.getpid()}")
        _remove(aside)
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)


def _alive(pid: int) -> bool:
    """Whether a process with this id exists; anything uncertain counts as alive (never clean it up)."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _discard(path: Path) -> None:
    """Remove a temporary file or folder after a failure, never masking the failure itself."""
    try:
        _remove(path)
    except OSError:
        pass


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _errno(err: BaseException) -> int | None:
    """The errno of an OSError, or one named in a wrapped error's message ("os error 28", "[Errno 28]")."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        match = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(err))
        if match:
            return int(match[1] or match[2])
        err = err.__cause__ or err.__context__
    return None


def _free_mb(path: Path) -> str:
    anchor = path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        return f"{shutil.disk_usage(anchor).free / 2**20:.0f} MB free"
    except OSError:
        return ""


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
