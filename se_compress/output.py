"""Where se_compress writes, and the one rule for replacing what is there: nothing a user owns is ever lost.

- An output folder is *ours* when it holds one of the reports se_compress writes next to everything it makes
  (OWN_MARKERS: compression_report.json in every checkpoint, se_report.json, eval.json, ...), and that file reads
  as ours. Only such a folder (or an empty one: nothing to lose) may be replaced (`--force`) or have its reports
  rewritten. Any other existing folder or file is refused, whatever the flags.
- The output location is probed before any model work: a file is created and removed where the output will be
  created, so a read-only or missing location fails in seconds, not after a 40 s detection pass.
- Replacement is atomic: the new output is written complete in a hidden folder next to it; the old one is
  renamed aside, the new one renamed in, and only then is the old one deleted (restored if the rename fails).
- Written files get ordinary permissions (0666 & ~umask): safetensors' writer creates 0600 files.
"""
import errno
import json
import os
import shutil
from pathlib import Path

from .errors import SECompressError

# file name -> a key its JSON always has (a same-named file of another tool is not taken for ours)
OWN_MARKERS = {
    "compression_report.json": "method",
    "se_report.json": "super_experts",
    "eval.json": "kind",
    "ablation.json": "se_ppl",
    "compare.json": "rows",
    "recipe.json": "recipe",
    "stability.json": "stable",
    "peer.json": "tool",  # a peer stage's checkpoint (se_compress/peers)
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def ordinary_permissions(path: Path) -> None:
    """0644 for files, 0755 for folders under the usual umask (022), all the way down: what a file written with
    open() gets. safetensors creates 0600 files, shutil.copy2 copies the source's mode, mkdtemp makes 0700."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, 0o777 & ~UMASK)
        for child in path.iterdir():
            ordinary_permissions(child)
    elif path.is_file() and not path.is_symlink():
        os.chmod(path, 0o666 & ~UMASK)


def is_own_output(folder: Path) -> bool:
    """True when `folder` holds a report se_compress wrote (see OWN_MARKERS)."""
    for name, key in OWN_MARKERS.items():
        f = Path(folder) / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and key in data:
                return True
    return False


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists (where the output's folders would be created)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def probe_writable(where: Path, out: Path) -> None:
    """Create and remove a file in `where` (an existing folder): one line naming `out` if that is not possible."""
    where = Path(where)
    if not where.is_dir():
        raise SECompressError(f"cannot write {out}: {where} is a file, not a folder; choose another --out")
    probe = where / f".se_compress-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        try:
            probe.unlink()
        except OSError:
            pass
        raise SECompressError(f"cannot write {out}: {where} is {_why(exc)}; choose another --out") from None


def _why(exc: OSError) -> str:
    return {errno.EROFS: "on a read-only file system", errno.EACCES: "not writable (permission denied)",
            errno.EPERM: "not writable (operation not permitted)", errno.ENOSPC: "on a full disk",
            errno.EDQUOT: "over its disk quota", errno.ENOENT: "not a folder files can be created in",
            errno.ENOTDIR: "not a folder"}.get(exc.errno, f"not writable ({exc.strerror})")


def check_output(out, *, inputs=(), force: bool = False, kind: str = "checkpoint") -> Path:
    """Refuse an output location before any work; returns it as a Path.

    kind "checkpoint": the folder is replaced as a whole (quantize/prune/merge/compress): an existing folder of
    ours needs `force`, and the output must not be inside, hold or be any input.
    kind "report": report files are written into the folder (detect/ablate/eval/compare): an existing folder of
    ours is updated file by file, an input folder itself is never written.
    Either way a file, or an existing folder that is not empty and not ours, is refused whatever `force` says, and
    the location is probed for writability."""
    out = Path(out).expanduser()
    real = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        inside = src in real.parents
        if real == src or real in src.parents or (kind == "checkpoint" and inside):
            raise SECompressError(f"output {out} would overwrite the input model {src}: choose another --out")
    if os.path.lexists(out):
        if not out.is_dir():
            raise SECompressError(f"output {out} is an existing file, not an se_compress output folder: se_compress "
                                  f"never replaces it; choose another --out")
        if any(out.iterdir()) and not is_own_output(out):
            raise SECompressError(f"output {out} is an existing folder that se_compress did not write (no "
                                  f"compression_report.json, se_report.json or eval.json in it): se_compress never "
                                  f"replaces it, even with --force; choose another --out or move it away")
        if kind == "checkpoint" and not force:
            raise SECompressError(f"output {out} already exists: choose another --out or pass --force to replace it")
        probe_writable(out if kind == "report" else _nearest_existing(out.parent), out)
    else:
        probe_writable(_nearest_existing(out.parent), out)
    return out


def replace_folder(new: Path, out: Path) -> Path:
    """Move the complete folder `new` to `out`; an existing `out` is deleted only after `new` is in its place."""
    new, out = Path(new), Path(out)
    ordinary_permissions(new)
    if not os.path.lexists(out):
        os.replace(new, out)
        return out
    if out.is_dir() and any(out.iterdir()) and not is_own_output(out):  # appeared while we worked
        raise SECompressError(f"output {out} was filled by something else while se_compress worked: nothing "
                              f"replaced; run again or choose another --out")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old, out)  # put the old output back; the caller reports the error
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_files_into(out: Path, files: dict, writers=()) -> Path:
    """Write report files into `out` (created if missing): each file is written to a hidden name first and renamed
    over the old one, so a report is either the old one or the new one, never half of each. `files`: name ->
    text; `writers`: callables taking a staging folder and writing more files (plots) into it."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not is_own_output(out):
        raise SECompressError(f"{out} is a folder that se_compress did not write: not writing reports into it; "
                              f"choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SECompressError(f"cannot write {out}: {exc.strerror}; choose another --out") from None
    staging = out / f".se_compress-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, text in files.items():
            (staging / name).write_text(text)
        for write in writers:
            write(staging)
        for f in sorted(staging.iterdir()):
            ordinary_permissions(f)
            os.replace(f, out / f.name)
    except OSError as exc:
        raise SECompressError(f"could not write {out}: {exc.strerror} (free space or choose another --out)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
