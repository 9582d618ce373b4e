"""SIGTERM ends a command the way Ctrl-C does: the stack unwinds (temporary output folders are removed on the
way), one line is printed, and the exit status is 143 (128 + 15, what a shell reports for SIGTERM).

Python's default for SIGTERM is to die on the spot: no cleanup, a hidden `.<out>.partial` folder left behind.
`terminate_like_interrupt` raises `Terminated` instead, for as long as a command runs, and puts back whatever
handler was there before. A distributed run (distributed.session) and torchrun's launcher (`restored` around it)
install handlers of their own and put the previous ones back when they end, so that SIGTERM still stops the
process afterwards (it used to stay ignored after a distributed run). After a failed distributed run SIGTERM is
ignored while the failure is reported (torchrun sends it again), until the command returns.
"""
import contextlib
import signal
import threading

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (a BaseException, so `except Exception` does not eat it)."""


_received = []  # native code (safetensors, torch) may turn the exception it is handed into another type


def received() -> bool:
    """True once SIGTERM arrived in this process (whatever exception it ended up as)."""
    return bool(_received)


def raise_terminated(signum, frame):
    _received.append(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM during cleanup must not cut the cleanup short
    raise Terminated()


@contextlib.contextmanager
def restored(*signums):
    """Whatever handlers the body installs for `signums` are replaced by the previous ones when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def terminate_like_interrupt():
    """SIGTERM raises Terminated inside the body; the previous handler is restored after it, and received() is
    False again (it says whether this body was stopped)."""
    _received.clear()
    try:
        with restored(signal.SIGTERM):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, raise_terminated)
            yield
    finally:
        _received.clear()
