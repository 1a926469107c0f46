"""Writing outputs without ever touching what the tool did not create.

Every output folder (an audit's results, an ablated model) is built in a temporary sibling and
renamed into place when complete; it carries a marker file (``MARKER``) that says this tool wrote it.
Rules, in one place for every command:

- a destination that is, contains, or lies inside an input is refused (``--force`` included): the
  inputs are resolved through symlinks, so a Hugging Face cache snapshot and its blobs count too;
- an existing destination is replaced only with ``--force``, and only when it is empty or holds our
  marker; a folder or file of anyone else's is never deleted;
- the final rename never replaces a destination that appeared meanwhile (a concurrent writer):
  ``rename`` onto a non-empty folder fails, and single files are linked into place, which fails when
  the name exists;
- folders and files get the user's umask (``mkdtemp``/``mkstemp`` would make them private); files and
  folders are fsynced before the rename, so a crash leaves the old output or the new one, whole;
- every temporary is a folder of ours (``.NAME.tmp-PID-*``, our marker written first; a single file is written inside
  one and renamed out of it), so a killed run's temporaries are removed when their process is gone, and nothing
  without our marker ever is (a user's file or folder that happens to match the pattern stays);
- scratch folders (accelerate's disk offload) are temporaries too: ``scratch_folder`` makes one, never in or around an
  input, and ``remove_scratch`` removes it (only one with our marker).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from checks.errors import AuditError

MARKER = ".moe-ablation-audit"  # inside every output folder this tool writes
TOOL = "moe-ablation-audit"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path, directory: bool) -> None:
    """Give ``path`` the mode a plain mkdir/open would have under the user's umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to disk; quietly skipped where the file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Give every file and folder under ``root`` the user's umask (some writers, safetensors' among them, make files
    private) and fsync them (deepest first), then ``root`` itself."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                public_mode(p, directory=False)
                fsync_path(p)
        public_mode(Path(dirpath), directory=True)
        fsync_path(Path(dirpath), directory=True)


NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a write that failed for want of room: the user's to fix, never a half output


def no_room(e: BaseException) -> str | None:
    """Why a write failed for want of room ("No space left on device", "File too large", ...), or None for any other
    failure. safetensors' writer reports the OS error in its message rather than as an OSError."""
    if isinstance(e, OSError) and e.errno in NO_ROOM:
        return e.strerror or os.strerror(e.errno)
    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return os.strerror(int(m.group(1))) if m and int(m.group(1)) in NO_ROOM else None


def _not_written(dest: Path, why: str) -> AuditError:
    return AuditError(f"{dest}: could not be written ({why}); nothing of it was left behind -- free space (or raise the file-size "
                      "limit, ulimit -f) and run again, or choose another -o")


# -- inputs and destinations -------------------------------------------------------------------


def input_roots(inputs: Iterable[str | os.PathLike | None]) -> list[Path]:
    """Every path an output must stay clear of: each input resolved, and for folders the targets of the
    symlinks in them (a Hugging Face cache snapshot links to ../../blobs)."""
    roots: list[Path] = []
    for inp in inputs:
        if inp is None:
            continue
        p = Path(inp)
        if not p.exists() and not p.is_symlink():
            continue
        roots.append(p.absolute())
        roots.append(Path(os.path.realpath(p)))  # realpath, not resolve: a symlink loop is the reader's to report, not a crash here
        if p.is_dir():
            try:
                for child in p.iterdir():
                    if child.is_symlink():
                        roots.append(Path(os.path.realpath(child)).parent)
            except OSError:
                pass
    return list(dict.fromkeys(roots))


def _related(dest: Path, root: Path) -> str | None:
    if dest == root:
        return "is"
    if root in dest.parents:
        return "lies inside"
    if dest in root.parents:
        return "contains"
    return None


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a folder this tool wrote (it holds our marker)."""
    try:
        return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()
    except OSError:
        return False


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_destination(dest: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), force: bool = False,
                      kind: str = "folder", ours: Callable[[Path], bool] | None = None) -> Path:
    """The absolute destination, after every refusal that can be decided before long work starts.

    ``kind`` is "folder" or "file". ``ours(path)`` tells whether an existing file is one this tool wrote
    (folders: the marker). Raises AuditError naming the destination and what to do.
    """
    dest = Path(dest).absolute()
    real = Path(os.path.realpath(dest))
    for root in input_roots(inputs):
        for d in (dest, real):
            rel = _related(d, root)
            if rel:
                raise AuditError(f"{dest}: {rel} the input {root}; outputs never go into, onto or around an input -- choose another -o")
    anc = _nearest_existing(dest.parent)
    if not anc.is_dir():
        raise AuditError(f"{dest}: its parent {anc} is a file, not a folder; choose another -o")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise AuditError(f"{dest}: cannot create it: {anc} is not writable by this user; choose another -o")
    if dest.is_symlink() or dest.exists():
        if kind == "folder":
            if not dest.is_dir() or dest.is_symlink():
                raise AuditError(f"{dest}: exists and is not a folder; choose another -o")
            try:
                empty = not any(dest.iterdir())
            except OSError as e:
                raise AuditError(f"{dest}: cannot read it ({e.strerror}); choose another -o") from None
            if not empty:
                if not force:
                    raise AuditError(f"{dest}: exists and is not empty; choose another -o or pass --force to replace an earlier output of this tool")
                if not is_ours(dest):
                    raise AuditError(f"{dest}: exists and was not written by this tool (no {MARKER} marker); --force replaces only "
                                     "this tool's own outputs -- choose another -o or remove it yourself")
        else:
            if dest.is_dir():
                raise AuditError(f"{dest}: is a folder; -o needs a file name here")
            if not force:
                raise AuditError(f"{dest}: exists; choose another -o or pass --force to replace an earlier output of this tool")
            if ours is None or not ours(dest):
                raise AuditError(f"{dest}: exists and was not written by this tool; --force replaces only this tool's own outputs -- "
                                 "choose another -o or remove it yourself")
    return dest


# -- stale temporaries -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _temp_name(dest: Path, what: str) -> str:
    return f".{dest.name}.{what}-{os.getpid()}-"


def _marker_text(kind: str) -> str:
    return json.dumps({"tool": TOOL, "kind": kind, "pid": os.getpid(), "host": socket.gethostname(),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"


def temp_folder(dest: Path, what: str, kind: str) -> Path:
    """A new temporary folder of ours beside ``dest`` (``.NAME.{what}-PID-*``), its marker written first; stale ones of
    ours for ``dest`` are removed first. Raises OSError where the folder cannot be made."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(dest, what), dir=dest.parent))
    try:
        (tmp / MARKER).write_text(_marker_text(kind))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def clean_stale(dest: Path) -> list[Path]:
    """Remove our temporary folders for ``dest`` whose process is gone (same host; our marker in them); returns what was
    removed. Nothing without our marker is touched, whatever its name."""
    removed = []
    host = socket.gethostname()
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        for what in ("tmp", "old"):
            prefix = f".{dest.name}.{what}-"
            if not p.name.startswith(prefix):
                continue
            pid_s = p.name[len(prefix):].split("-", 1)[0]
            if not pid_s.isdigit() or _alive(int(pid_s)) or not p.is_dir() or p.is_symlink():
                continue
            try:
                info = json.loads((p / MARKER).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and info.get("tool") == TOOL and info.get("host") == host:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# -- folders -----------------------------------------------------------------------------------


class OutputDir:
    """Build an output folder in a temporary sibling; ``commit`` renames it into place.

    ``inputs`` and ``force`` as in ``check_destination``. On an exception inside ``with`` the
    temporary folder is removed. The marker is written first, so a killed run's temporary is ours to clean.
    """

    def __init__(self, dest: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), force: bool = False, kind: str = "audit output"):
        self.inputs = list(inputs)
        self.dest = check_destination(dest, self.inputs, force)
        self.force = force
        try:
            self.tmp = temp_folder(self.dest, "tmp", kind)
        except OSError as e:
            raise (_not_written(self.dest, no_room(e)) if no_room(e) else
                   AuditError(f"{self.dest}: cannot create the output folder ({e.strerror}); choose another -o")) from None
        public_mode(self.tmp, directory=True)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            why = no_room(exc)
            if why:
                raise _not_written(self.dest, why) from None

    def commit(self) -> Path:
        """Rename the finished folder into place (fsynced first); never over a destination that appeared meanwhile."""
        fsync_tree(self.tmp)
        old = None
        if self.dest.exists() or self.dest.is_symlink():
            empty = self.dest.is_dir() and not self.dest.is_symlink() and not any(self.dest.iterdir())
            if not self.force and not empty:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise AuditError(f"{self.dest}: appeared while this run was writing (another run?); nothing was replaced -- "
                                 "choose another -o, or pass --force to replace an output of this tool")
            try:
                check_destination(self.dest, self.inputs, self.force)  # still ours (or empty)?
            except AuditError:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            old = temp_folder(self.dest, "old", "previous output")
            try:
                os.rename(self.dest, old / "previous")
            except FileNotFoundError:  # another writer moved it first
                pass
        try:
            os.rename(self.tmp, self.dest)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise AuditError(f"{self.dest}: appeared while this run was writing (another run?); nothing was replaced -- "
                                 "choose another -o, or pass --force to replace an output of this tool") from None
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)  # the previous output: ours, checked above
        fsync_path(self.dest.parent, directory=True)
        return self.dest


# -- scratch folders ---------------------------------------------------------------------------


def scratch_folder(parent: str | os.PathLike | None, name: str, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """A new temporary folder of ours, ``PARENT/.NAME.tmp-PID-*`` (``parent`` None: the system's temporary folder),
    marker written first; the caller removes it with ``remove_scratch``, a killed run's is removed by the next one.

    Refused where ``parent`` is, or lies inside, an input (a folder beside an input is fine: nothing of it is touched).
    """
    base = Path(parent).absolute() if parent is not None else Path(tempfile.gettempdir())
    for root in input_roots(inputs):
        for d in (base, Path(os.path.realpath(base))):
            if _related(d, root) in ("is", "lies inside"):
                raise AuditError(f"{base}: {_related(d, root)} the input {root}; scratch files never go into an input -- "
                                 "pass --offload-folder a folder outside the model directories")
    if base.exists() and not base.is_dir():
        raise AuditError(f"{base}: is a file; --offload-folder takes a folder")
    try:
        return temp_folder(base / name, "tmp", "scratch")
    except OSError as e:
        raise AuditError(f"{base}: cannot create a scratch folder there ({e.strerror}); pass --offload-folder a writable folder") from None


def remove_scratch(path: str | os.PathLike) -> None:
    """Remove a folder made by ``scratch_folder`` (nothing else: it must hold our marker)."""
    p = Path(path)
    if is_ours(p):
        shutil.rmtree(p, ignore_errors=True)


# -- single files ------------------------------------------------------------------------------


def write_file(dest: str | os.PathLike, write: Callable[[Path], None], inputs: Iterable[str | os.PathLike | None] = (),
               force: bool = False, ours: Callable[[Path], bool] | None = None) -> Path:
    """Write one output file: ``write(path)`` fills ``path`` inside a temporary folder of ours beside ``dest``; the file
    is then linked into place (renamed over ``dest`` when replacing) and the folder removed, so ``dest`` is never half
    written and a killed run leaves only a temporary the next one removes.

    Without ``force`` the link fails if ``dest`` appeared meanwhile (no silent replace); with it, only a file ``ours``
    recognises is replaced. The file gets the user's umask.
    """
    inputs = list(inputs)
    dest = check_destination(dest, inputs, force, kind="file", ours=ours)
    try:
        folder = temp_folder(dest, "tmp", "partial file")
    except OSError as e:
        raise (_not_written(dest, no_room(e)) if no_room(e) else AuditError(f"{dest}: cannot write it ({e.strerror}); choose another -o")) from None
    tmp = folder / dest.name
    try:
        try:
            write(tmp)
        except Exception as e:
            why = no_room(e)
            if why:
                raise _not_written(dest, why) from None
            raise
        public_mode(tmp, directory=False)
        fsync_path(tmp)
        if dest.exists():
            check_destination(dest, inputs, force, kind="file", ours=ours)
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise AuditError(f"{dest}: appeared while this run was writing (another run?); nothing was replaced -- choose another -o") from None
            except OSError:  # a file system without hard links: rename (a race here is the file system's limit)
                if dest.exists():
                    raise AuditError(f"{dest}: appeared while this run was writing; nothing was replaced") from None
                os.rename(tmp, dest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fsync_path(dest.parent, directory=True)
    return dest
