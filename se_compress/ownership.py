"""What se_compress wrote, recorded by the writer itself: the one proof that replacing a file loses nothing of the user's.

A report file was not proof: the shipped default model holds an `se_report.json`, so a copy of it with the user's
notes added counted as "our output", and `prune --out COPY --force` deleted the notes. Nor was the name README.md:
`push --dry-run` replaced a hand-written model card. So every writer (output.replace_folder, write_files_into,
push) leaves a hidden marker file, MARKER, listing each file it wrote with its SHA-256 (files above DIGEST_LIMIT:
their size; hashing gigabytes of weights to re-run a command is not worth it, and a user does not edit them).

- A folder is *our output* when its marker says so and every file in it is one the marker lists, unchanged, or lies
  in a subfolder that is itself our output (`<checkpoint>/eval`). One file more (the user's notes) or one report
  edited by hand, and it is not: it is never replaced, even with --force. A copy of a model (the shipped one holds
  an se_report.json) has no marker; a copy of our output with the user's notes added lists no notes. A pristine
  copy or a moved output is ours: replacing it loses nothing of the user's.
- A single file is ours when the marker beside it lists it unchanged (push's README.md in a folder we did not
  write: the marker then says `output: false`).
"""
import hashlib
import json
import os
from pathlib import Path

MARKER = ".se_compress-output.json"
DIGEST_LIMIT = 2**20
TRANSIENT = (".se_compress-staging-", ".se_compress-probe-", ".README.md.tmp", MARKER)  # our own work files


def _fingerprint(path: Path) -> str:
    size = path.stat().st_size
    if size > DIGEST_LIMIT:
        return f"size:{size}"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _entries(folder: Path):
    """Every file, link and folder below `folder` (links never followed), relative, in a stable order."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(os.path.relpath(os.path.join(root, name), folder)).as_posix()
            if not Path(rel).name.startswith(TRANSIENT) or "/" in rel:
                yield rel
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]


def read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "se_compress" or not isinstance(data.get("files"), dict):
        return None
    return data


def mark(folder: Path, names=None, output: bool = True) -> None:
    """Record that se_compress wrote `names` (default: every file now in `folder`) in it, added to what the marker
    already lists. Written under a hidden name and renamed: a marker is whole or absent."""
    folder = Path(folder)
    old = read_marker(folder) or {"files": {}}
    names = list(_entries(folder)) if names is None else list(names)
    files = dict(old["files"])
    files.update({n: _fingerprint(folder / n) for n in names if (folder / n).is_file() and not (folder / n).is_symlink()})
    data = {"written_by": "se_compress", "output": bool(output or old.get("output")), "files": dict(sorted(files.items()))}
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1))
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / MARKER)


def foreign_file(folder: Path) -> str | None:
    """None when `folder` is our output (see the module docstring); else the first thing in it that is not ours, or
    why the folder as a whole is not ours."""
    folder = Path(folder)
    data = read_marker(folder)
    if data is None or not data.get("output"):
        return None if not any(_entries(folder)) else f"not an output of se_compress: no {MARKER} listing its files"
    listed, subfolders = data["files"], {}
    for rel in _entries(folder):
        sub = _marked_subfolder(folder, rel)
        if sub is not None:  # a report folder of ours inside (<checkpoint>/eval) answers for what it holds
            if sub not in subfolders:
                subfolders[sub] = foreign_file(folder / sub)
            if subfolders[sub] is None:
                continue
            return f"{sub}/{subfolders[sub]}"
        path = folder / rel
        if rel in listed and path.is_file() and not path.is_symlink():
            if _fingerprint(path) != listed[rel]:
                return f"{rel} (changed since se_compress wrote it)"
            continue
        return rel
    return None


def _marked_subfolder(folder: Path, rel: str) -> str | None:
    """The deepest folder above `rel` (inside `folder`) that holds a marker of its own, or None."""
    parts = rel.split("/")[:-1]
    for i in range(len(parts), 0, -1):
        sub = "/".join(parts[:i])
        if (folder / sub / MARKER).is_file() and not (folder / sub).is_symlink():
            return sub
    return None


def is_own_file(path: Path) -> bool:
    """True when the marker beside `path` lists it, unchanged."""
    path = Path(path)
    data = read_marker(path.parent)
    recorded = (data or {}).get("files", {}).get(path.name)
    return recorded is not None and path.is_file() and not path.is_symlink() and _fingerprint(path) == recorded
