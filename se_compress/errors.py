class SECompressError(Exception):
    """A problem with the user's input. The CLI prints it as one line (no traceback) and exits 2.

    The message names the problem and the fix, e.g. "no safetensors weights in X: ... pass --allow-pickle".
    """

