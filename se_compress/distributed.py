"""Several processes, one result: the torch.distributed session and its communication, nothing of any stage.

Launch with torchrun (`torchrun --nproc-per-node N -m se_compress quantize ...`): every rank streams the same
decoder layer. Without torchrun (or with N = 1) nothing here does anything and the code paths are the usual ones.

- Data parallel: the calibration set is cut into batches exactly as in one process; rank r runs the batches
  b with b % N == r (`my_batches`). A batch is computed the same way on whichever rank runs it.
- The statistics own their reductions (accumulators: add / reduce / result): detection's recorders in
  detect/stats.py, the Hessians in quant/hessian.py, the expert-parallel GPTQ exchange in quant/expert_split.py. They
  use the collectives below, which give every rank the same bits (`sum_in_rank_order` adds the ranks in a fixed order).
- Failure: a collective that fails (a peer's process ended) or torchrun's SIGTERM becomes one line naming the
  rank that died (found by the process ids every rank registers in torchrun's store); the first rank to report
  prints it, the others stay silent. Outputs go through temporary folders, so nothing is left at the output name.
"""
import contextlib
import datetime
import os
import signal
import socket
import sys
import time

import torch

from .errors import SECompressError
from .signals import EXIT_TERMINATED, Terminated, raise_terminated, received, restored  # SIGTERM unwinds like KeyboardInterrupt, cleaning up

DISTRIBUTED_COMMANDS = ("detect", "quantize", "compress")
LAUNCHER_ENV = "SE_COMPRESS_LAUNCHER"  # set by `se-compress --nproc N` for its workers
KILL_HOOK = "SE_COMPRESS_TEST_KILL"  # tests: "RANK:LAYER" kills that rank (SIGKILL) when quantize reaches LAYER


class PeerFailed(RuntimeError):
    """A collective failed: another rank is gone (or stopped answering)."""




class _State:
    rank, world, local_rank, backend = 0, 1, 0, None
    store = None
    stderr = None


_S = _State()


def world() -> int:
    return _S.world


def rank() -> int:
    return _S.rank


def active() -> bool:
    """True in a torchrun launch of more than one process."""
    return _S.world > 1


def is_main() -> bool:
    return _S.rank == 0


def device() -> str | None:
    """The device this rank computes on under NCCL (cuda:LOCAL_RANK); None under gloo/one process."""
    return f"cuda:{_S.local_rank}" if _S.backend == "nccl" else None


def device_spec(spec: str | None) -> str | None:
    """The --device value for this rank: under NCCL, auto/cuda (unset included) mean this rank's GPU, cuda:LOCAL_RANK
    (a recipe's `device: cuda` too, since the CLI's value wins); otherwise `spec` unchanged."""
    if _S.backend == "nccl" and (spec is None or str(spec).strip().lower() in ("auto", "cuda")):
        return device()
    return spec


# ----------------------------------------------------------------------------------------------------------------
# start, stop, failure


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(command: str, device_spec: str | None = None) -> None:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the env)."""
    if not _launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return
    import torch.distributed as dist

    _S.rank, _S.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if command not in DISTRIBUTED_COMMANDS:
        raise SECompressError(f"'{command}' runs in one process: launch it without torchrun "
                              f"(several processes: {', '.join(DISTRIBUTED_COMMANDS)})")
    _S.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    on_cpu = device_spec is not None and str(device_spec).strip().lower() == "cpu"
    _S.backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() and not on_cpu else "gloo"
    if _S.backend == "nccl":
        torch.cuda.set_device(_S.local_rank)
    # Long enough for rank 0 to write a layer while the others wait at the next collective; a dead peer is seen
    # at once on gloo (its sockets close), on NCCL through torchrun's SIGTERM.
    timeout = datetime.timedelta(seconds=float(os.environ.get("SE_COMPRESS_DIST_TIMEOUT", 900)))
    dist.init_process_group(_S.backend, timeout=timeout)
    from torch.distributed.distributed_c10d import _get_default_store

    _S.store = _get_default_store()
    _S.store.set(f"se_compress/pid/{_S.rank}", f"{socket.gethostname()} {os.getpid()}")
    _S.stderr = sys.stderr
    if not is_main():  # rank 0 reports; the others print nothing but errors (see _print)
        devnull = open(os.devnull, "w")
        sys.stdout = sys.stderr = devnull
        import warnings

        warnings.filterwarnings("ignore")
    signal.signal(signal.SIGTERM, raise_terminated)  # recorded: signals.received()



def shutdown() -> None:
    if active():
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        _S.world, _S.rank = 1, 0


def _print(line: str) -> None:
    print(line, file=_S.stderr or sys.stderr, flush=True)


def _dead_ranks(wait: float = 5.0) -> list[int]:
    """Ranks on this host whose process has ended (gone or a zombie), polled for up to `wait` seconds."""
    host = socket.gethostname()
    pids = {}
    for r in range(_S.world):
        with contextlib.suppress(Exception):
            h, pid = _S.store.get(f"se_compress/pid/{r}").decode().split()
            if h == host:
                pids[r] = int(pid)
    deadline = time.time() + wait
    while True:
        dead = [r for r, pid in sorted(pids.items()) if r != _S.rank and not _alive(pid)]
        if dead or time.time() > deadline:
            return dead
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _claim() -> bool:
    """True for the first rank to report a failure (torchrun's store outlives any rank); others stay silent."""
    if _S.store is None:  # failed before joining the group (a bad command or option): the same on every rank
        return is_main()
    try:
        _S.store.set_timeout(datetime.timedelta(seconds=10))
        return _S.store.add("se_compress/failure_reports", 1) == 1
    except Exception:
        return True  # the store is gone with rank 0 (no torchrun agent): better twice than never


@contextlib.contextmanager
def session(command: str, device_spec: str | None = None):
    """Run a CLI command: without torchrun, as usual; under torchrun, join the group, and turn any failure into one
    line (printed by the first rank to see it) and SystemExit, so that every rank ends."""
    if not (_launched() and int(os.environ["WORLD_SIZE"]) > 1):
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    with _session(command, device_spec):
        yield
    # A run that ended well puts back the SIGTERM handler it replaced (signals.py). After a failure SIGTERM stays
    # ignored while the failure is reported (torchrun repeats it: a second one must not cut the line short); the
    # CLI puts its caller's handler back when the command returns (signals.terminate_like_interrupt).
    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _session(command: str, device_spec: str | None):
    try:
        init_from_env(command, device_spec)
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001: every failure of a rank must end in one line
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code, line = _failure_line(exc)
        if line and _claim():
            _print(line)
        raise SystemExit(code) from None
    finally:
        shutdown()


def _failure_line(exc: BaseException) -> tuple[int, str]:
    me = f"rank {_S.rank}"
    # received(): SIGTERM raised Terminated inside code that turned it into another error (torch's sequence-to-tensor
    # conversion reports it as "ValueError: could not determine the shape ...": seen once in CI under --nproc 2)
    if isinstance(exc, (PeerFailed, Terminated)) or received():
        if os.environ.get(LAUNCHER_ENV):
            return 1, ""  # `se-compress --nproc`: the launcher names the rank that died (its exit status is known)
        dead = _dead_ranks() if _S.store is not None else []
        if dead:
            names = ", ".join(str(r) for r in dead)
            return 1, (f"error: rank {names} failed (its process ended); every rank stopped and nothing was written "
                       f"at the output name: re-run to start cleanly")
        if isinstance(exc, Terminated) or received():
            return EXIT_TERMINATED, (f"error: {me} was stopped (SIGTERM) before it finished; nothing was written at "
                                     f"the output name")
        return 1, f"error: {me} lost its peers: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if isinstance(exc, SECompressError):
        if not is_main():
            time.sleep(1.0)  # the same input error on every rank: let rank 0 say it once, without a rank number
            return 2, f"error: {me}: {exc}"
        return 2, f"error: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "error: interrupted; nothing was left half-written (outputs go through a temporary folder)"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return 1, f"error: {me} failed: {type(exc).__name__}: {first}"


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError, ConnectionError) as exc:  # gloo/NCCL errors surface as RuntimeError
        raise PeerFailed(str(exc)) from None


def _comm(t: torch.Tensor) -> torch.Tensor:
    """NCCL reduces tensors on this rank's GPU, gloo on the CPU."""
    return t.to(device() or "cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    c = _comm(t)
    _collective(dist.all_reduce, c)
    return c.to(t.device)


def sum_in_rank_order(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t`, added in rank order (0 + 1 + 2 ...), so that every rank holds the same bits and the
    order does not depend on the collective's algorithm. One process: `t` itself."""
    if not active():
        return t
    import torch.distributed as dist

    c = _comm(t.contiguous())
    parts = [torch.empty_like(c) for _ in range(_S.world)]
    _collective(dist.all_gather, parts, c)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total.to(t.device)


def groups_of(tensors: list, budget: int):
    """`tensors` cut into consecutive groups of at most `budget` elements (one too large alone is its own group): one
    collective per group instead of one per tensor, with bounded memory."""
    group, size = [], 0
    for t in tensors:
        if group and size + t.numel() > budget:
            yield group
            group, size = [], 0
        group.append(t)
        size += t.numel()
    if group:
        yield group


def all_gather_objects(obj) -> list:
    import torch.distributed as dist

    out = [None] * _S.world
    _collective(dist.all_gather_object, out, obj)
    return out


def broadcast_bytes(buf: torch.Tensor, src: int) -> torch.Tensor:
    import torch.distributed as dist

    c = _comm(buf)
    _collective(dist.broadcast, c, src)
    return c.to(buf.device)


def agree(value):
    """Rank 0's value on every rank (decisions that read the file system, which may change meanwhile)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    _collective(dist.broadcast_object_list, box, 0)
    return box[0]


def kill_hook(layer: int) -> None:
    """Tests: SE_COMPRESS_TEST_KILL=RANK:LAYER kills that rank outright (no cleanup, like the OOM killer)."""
    spec = os.environ.get(KILL_HOOK)
    if spec and active() and spec == f"{_S.rank}:{layer}":
        os.kill(os.getpid(), signal.SIGKILL)


def launch(nproc: int, argv: list[str]) -> int:
    """`se-compress --nproc N COMMAND ...`: torchrun's own launcher (torch.distributed.run, standalone rendezvous on a
    free port), N workers running `python -m se_compress COMMAND ...`; a failure ends in one line, not torchrun's
    traceback: a worker that failed by itself printed its line; one killed by a signal is named here."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise SECompressError(f"--nproc {nproc}: give the number of processes (GPUs of this node), 1 or more")
    # torch sets a level on each of its named loggers (so the parents' level does not reach them): quiet them all,
    # or a SIGTERM printed the agent's "Received 15 death signal" line before ours
    from torch.distributed.elastic.agent.server import api  # noqa: F401: creates the agent's loggers

    prefixes = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")
    for name in [n for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes)] + list(prefixes):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_ENV] = "1"
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "se_compress", *argv])
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        # torchrun's agent sets its own SIGTERM/SIGINT/SIGHUP/SIGQUIT handlers and leaves them: put ours back after
        with restored(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            run(args)
    except SignalException as exc:  # the agent stopped its workers and re-raises the signal it got
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise Terminated from None
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # killed (OOM killer, SIGKILL): it could not say so itself
            print(f"error: rank {failed_rank} failed (killed by {failure.signal_name()}); every rank stopped and "
                  f"nothing was written at the output name: re-run to start cleanly", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


# ----------------------------------------------------------------------------------------------------------------
# data parallel: batches


def my_batches(num_samples: int, batch_size: int) -> list[int]:
    """Global indices of the calibration batches this rank runs (all of them in one process)."""
    return list(range(_S.rank, -(-num_samples // batch_size), _S.world))


def batch_starts(num_samples: int, batch_size: int) -> list[int]:
    """First sample of each batch this rank runs."""
    return [b * batch_size for b in my_batches(num_samples, batch_size)]


def my_input_ids(input_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, list[int]]:
    """This rank's batches, concatenated (re-cut by batch_size they are the same batches), and their global indices."""
    ids = my_batches(input_ids.shape[0], batch_size)
    if not active():
        return input_ids, ids
    parts = [input_ids[b * batch_size: (b + 1) * batch_size] for b in ids]
    return (torch.cat(parts) if parts else input_ids[:0]), ids
