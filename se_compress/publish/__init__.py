"""`se-compress push`: write the model card into a checkpoint folder, then upload exactly that folder's files
(and the card) to a Hugging Face Hub model repo with huggingface_hub.

The token comes from the environment variable named by --token-env (HF_TOKEN by default) or from the HF cache
(`hf auth login`); it is handed to huggingface_hub and never printed: error messages are scrubbed of it too.
"""
import glob
import os
from pathlib import Path

from ..errors import SECompressError
from ..inputs import REPORT_LIMIT, regular_file
from ..ownership import is_own_file, mark
from .card import build_model_card, find_evaluation

__all__ = ["push_checkpoint", "upload_files", "build_model_card"]


def upload_files(folder: Path) -> list[str]:
    """The checkpoint's files, relative to `folder`: every file below it except hidden ones (.cache/, .git/,
    editor and work files), sorted. This is exactly what is uploaded, README.md included once written."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(rel.as_posix())
    return files


def _token(token_env: str) -> str:
    token = os.environ.get(token_env) or None
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise SECompressError(f"no Hugging Face token: set {token_env} (a write token from "
                              f"https://huggingface.co/settings/tokens) or run `hf auth login` "
                              f"(formerly `huggingface-cli login`)")
    return token


def _check_folder(checkpoint) -> Path:
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        raise SECompressError(f"checkpoint folder not found: {checkpoint} (push takes a local folder written by "
                              f"se-compress; download Hub models with huggingface_hub instead)")
    if not (folder / "config.json").exists():
        raise SECompressError(f"no config.json in {folder}: pass the checkpoint folder itself")
    if not any(folder.glob("*.safetensors")):
        raise SECompressError(f"no *.safetensors weights in {folder}: nothing to publish")
    return folder


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise SECompressError(f"bad --repo-id '{repo_id}': {str(exc).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise SECompressError(f"--repo-id must be ORG/NAME (your user name or an organization, then the model name); "
                              f"got '{repo_id}'")


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def push_checkpoint(checkpoint, repo_id: str, *, private: bool = False, dry_run: bool = False,
                    token_env: str = "HF_TOKEN", eval_file=None, base_model: str | None = None,
                    license: str | None = None, echo=print) -> dict:
    """Write README.md into the folder, then create the repo (exist_ok) and upload the folder's files.
    Returns {"card", "files", "metadata", "url" (None on a dry run)}."""
    folder = _check_folder(checkpoint)
    _check_repo_id(repo_id)
    readme = folder / "README.md"
    if os.path.lexists(readme) and not is_own_file(readme):  # a hand-written card: never replaced (ownership.py)
        raise SECompressError(f"{readme} was not written by se_compress (or was edited since): push never replaces it; "
                              f"move it aside (e.g. to NOTES.md) and run push again")
    token = None if dry_run else _token(token_env)  # fail on a missing token before writing anything
    if eval_file is not None and not Path(eval_file).exists():
        raise SECompressError(f"--eval file not found: {eval_file} (pass an eval.json or compare.json)")
    if eval_file is not None and not Path(eval_file).is_dir():
        regular_file(eval_file, "--eval file", REPORT_LIMIT)  # a device or FIFO: one line, never read (inputs.py)
    evaluation, found = find_evaluation(folder, Path(eval_file) if eval_file else None)

    card, meta = build_model_card(folder, repo_id, evaluation=evaluation, base_model=base_model, license=license)
    tmp = folder / ".README.md.tmp"
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(folder / "README.md")
    mark(folder, ["README.md"], output=False)  # ours from now on, and the folder stays ours if it was
    relation = meta.get("base_model_relation", "none")
    echo(f"card: {folder / 'README.md'} (base_model {meta.get('base_model', 'not on the Hub: omitted')}, "
         f"relation {relation}, license {meta.get('license', 'not found')}, evaluation "
         f"{found if found else 'none found'})")

    files = upload_files(folder)
    total = sum((folder / f).stat().st_size for f in files)
    if dry_run:
        echo(f"dry run: would upload {len(files)} files ({_human(total)}) to {repo_id}"
             f"{' (private)' if private else ''}:")
        for f in files:
            echo(f"  {f}  {_human((folder / f).stat().st_size)}")
        return {"card": card, "files": files, "metadata": meta, "url": None}

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    echo(f"uploading {len(files)} files ({_human(total)}) to {api.endpoint}/{repo_id}")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                   allow_patterns=[glob.escape(f) for f in files],
                                   commit_message="Upload with se-compress push")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no response"
        hint = {401: ": the token was refused; check it", 403: ": the token cannot write to this namespace",
                404: ": repository not found"}.get(status, "")
        raise SECompressError(_scrub(f"the Hub refused the upload (HTTP {status}{hint}): "
                                     f"{str(exc).splitlines()[0][:200]}", token)) from None
    except Exception as exc:  # noqa: BLE001: network errors come from the client's HTTP library (httpx2); one line
        raise SECompressError(_scrub(f"upload to {repo_id} failed ({type(exc).__name__}): "
                                     f"{str(exc).splitlines()[0][:200] if str(exc) else ''}; check the network", token)) from None
    url = f"{api.endpoint}/{repo_id}"
    echo(f"uploaded: {url} (commit {getattr(commit, 'oid', '')})")
    return {"card": card, "files": files, "metadata": meta, "url": url}


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message
