class SECompressError(Exception):
    """A problem with the user's input. The CLI prints it as one line (no traceback) and exits 2.

    The message names the problem and the fix, e.g. "no safetensors weights in X: ... pass --allow-pickle".
    """


def read_json_report(path, filename: str, what: str, written_by: str) -> dict:
    """A JSON report se_compress wrote (`filename`, `what` it holds), given as the file or the folder holding it; a
    missing or broken file is one line that says which command writes it."""
    import json
    from pathlib import Path

    from .inputs import REPORT_LIMIT, read_text

    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.exists():
        raise SECompressError(f"{what} not found: {path} (run {written_by} first, or pass its {filename})")
    try:
        return json.loads(read_text(path, what, REPORT_LIMIT))  # a device or FIFO: one line, never read
    except FileNotFoundError:
        raise SECompressError(f"{what} not found: {path} (run {written_by} first, or pass its {filename})") from None
    except ValueError:  # UnicodeDecodeError included
        raise SECompressError(f"{path} is not valid JSON: pass the {filename} written by {written_by}") from None
