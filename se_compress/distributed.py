"""Several processes, one result: data- and expert-parallel detect/quantize on torch.distributed.

Launch with torchrun (`torchrun --nproc-per-node N -m se_compress quantize ...`): every rank streams the same
decoder layer. Without torchrun (or with N = 1) nothing here does anything and the code paths are the usual ones.

- Data parallel: the calibration set is cut into batches exactly as in one process; rank r runs the batches
  b with b % N == r. A batch is computed the same way on whichever rank runs it.
- Statistics (detect) are reduced so that they equal the one-process values bit for bit: counts are summed;
  max |output| with its token and channel takes the largest value and, on a tie, the smallest global token index
  (what one process keeps: it only replaces a max by a strictly larger one, batch after batch); REAP/EAN sums are
  kept per batch and re-added in batch order; the hidden-state samples for the median are put back in batch order.
- Hessians (quantize) are all-reduced (sums of x^T x in the placement's stats dtype, fp32, and the token counts).
  One process adds the batches one after another, N processes add per-rank partial sums: the fp32 totals differ
  in the last bits (~1e-7 relative), so GPTQ, which rounds against them, can put a few codes one or two steps
  the other way (measured: 0.3% of the codes of the tiny test models, bench/results/distributed.md on a real layer
  shape). That is the one quantity that depends on N; detection statistics do not (bit-identical).
- Expert parallel: rank r solves the routed experts x with x % N == r (LayerQuantizer._solve_batched on its share,
  batched as in one process), then each rank broadcasts its codes and scales, and every rank writes the same
  dequantized weights into its copy of the layer, so all ranks compute the same next-layer inputs. Rank 0 puts
  the report records back in the one-process order and alone writes the checkpoint and the reports.
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
from .signals import EXIT_TERMINATED, Terminated, restored  # SIGTERM unwinds like KeyboardInterrupt, cleaning up

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
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


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
    if isinstance(exc, (PeerFailed, Terminated)):
        if os.environ.get(LAUNCHER_ENV):
            return 1, ""  # `se-compress --nproc`: the launcher names the rank that died (its exit status is known)
        dead = _dead_ranks() if _S.store is not None else []
        if dead:
            names = ", ".join(str(r) for r in dead)
            return 1, (f"error: rank {names} failed (its process ended); every rank stopped and nothing was written "
                       f"at the output name: re-run to start cleanly")
        if isinstance(exc, Terminated):
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
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
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


# ----------------------------------------------------------------------------------------------------------------
# detect: statistics


class BatchSums:
    """Keeps each batch's REAP/EAN sums of one ExpertRecorder apart, so that all ranks can re-add them in batch order
    (float64 sums in another order differ in the last bits). One slot is updated at most once per batch."""

    def __init__(self):
        self.partials: dict[int, dict[int, tuple]] = {}  # layer -> {global batch: (reap, ean)}

    @contextlib.contextmanager
    def batch(self, layer: int, recorder, global_batch: int):
        if recorder is None or not active():
            yield
            return
        saved = recorder.reap_sum.clone(), recorder.ean_sum.clone()
        recorder.reap_sum.zero_()
        recorder.ean_sum.zero_()
        try:
            yield
        finally:
            self.partials.setdefault(layer, {})[global_batch] = (recorder.reap_sum.clone(), recorder.ean_sum.clone())
            recorder.reap_sum, recorder.ean_sum = saved


def _argmax_reduce(values: torch.Tensor, tokens: torch.Tensor, extra: torch.Tensor | None = None):
    """values/tokens [ranks, n]: the largest value; on a tie the smallest token index (-1, never set, first)."""
    best = values.max(0).values
    candidates = torch.where(values == best, tokens.double(), torch.inf)
    winner = candidates.argmin(0)
    idx = torch.arange(values.shape[1])
    return best, tokens[winner, idx], (extra[winner, idx] if extra is not None else None)


def reduce_statistics(stats, sums: BatchSums) -> None:
    """Make every rank's Statistics the one-process values (see the module docstring)."""
    if not active():
        return
    for layer in sorted(stats.experts):
        rec = stats.experts[layer]
        rec.count = all_reduce_sum(rec.count)
        mine = torch.stack([rec.max_output, rec.max_token.double(), rec.max_channel.double()])
        got = torch.stack([torch.as_tensor(g) for g in all_gather_objects(mine)])
        best, token, channel = _argmax_reduce(got[:, 0], got[:, 1].long(), got[:, 2].long())
        rec.max_output, rec.max_token, rec.max_channel = best, token, channel
        partials = {}
        for part in all_gather_objects(sums.partials.get(layer, {})):
            partials.update(part)
        reap, ean = torch.zeros_like(rec.reap_sum), torch.zeros_like(rec.ean_sum)
        for b in sorted(partials):  # the one-process order: 0 + s_0 + s_1 + ...
            reap += partials[b][0]
            ean += partials[b][1]
        rec.reap_sum, rec.ean_sum = reap, ean
    for h in stats.hidden:
        got = all_gather_objects((h.max_abs, h.max_token, h.first_token_max, h.other_token_max, h.samples,
                                  getattr(h, "batch_ids", [])))
        best, token, _ = _argmax_reduce(torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got]))
        h.max_abs, h.max_token = best, token
        h.first_token_max = max(g[2] for g in got)
        h.other_token_max = max(g[3] for g in got)
        by_batch = {}
        for g in got:
            by_batch.update(zip(g[5], g[4]))
        h.samples = [by_batch[b] for b in sorted(by_batch)]


# ----------------------------------------------------------------------------------------------------------------
# quantize: Hessians and expert-parallel GPTQ


def reduce_hessians(sums, collector=None) -> None:
    """Sum every rank's Hessians (in their stats dtype) and token counts, in place: HessianSum objects and an
    ExpertCollector. A rank whose batches never reached a matrix contributes zeros."""
    if not active():
        return
    sums = list(sums)
    if collector is not None:
        sums += ([collector.shared_in] if collector.shared_in is not None else [])
        sums += [collector.expert_in[e] for e in sorted(collector.expert_in)]
        sums += [collector.down[e] for e in sorted(collector.down)]
        collector.count = all_reduce_sum(collector.count)
    if not sums:
        return
    for s in sums:  # a sum that saw no input on this rank has no matrix yet (quant/hessian.py creates it lazily)
        where = next((m.device for t in sums for m in (t.H, t.Ht) if m is not None), None)
        if s.H is None:
            s.H = torch.zeros(s.dim, s.dim, dtype=s.dtype, device=where)
        if s.track_triggers and s.Ht is None:
            s.Ht = torch.zeros(s.dim, s.dim, dtype=s.dtype, device=where)
    counts = torch.tensor([[s.n, s.nt] for s in sums], dtype=torch.long)
    counts = all_reduce_sum(counts)
    for s, (n, nt) in zip(sums, counts.tolist()):
        s.n, s.nt = n, nt
    matrices = [m for s in sums for m in (s.H, s.Ht) if m is not None]
    budget = 1 << 25  # float64 elements per all-reduce (256 MB)
    group, size = [], 0
    for m in matrices + [None]:
        if m is None or (group and size + m.numel() > budget):
            flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in group]))
            offset = 0
            for g in group:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
            group, size = [], 0
        if m is not None:
            group.append(m)
            size += m.numel()


class ExpertSplit:
    """Who solves which expert of one layer, and the exchange afterwards (see the module docstring).

    `begin(x)` opens a job (the per-expert work of the loop: kept experts, RTN, fallbacks) and says whether this
    rank runs it; `solve` runs this rank's share of a batched GPTQ. The records a job adds to the engine's report lists are set aside and merged back on
    rank 0 in job order, so the report is the one-process report. `finish()` broadcasts the codes."""

    def __init__(self, quantizer, experts, inter: int):
        self.lq, self.experts, self.inter = quantizer, experts, inter
        self.on = active()
        self.seq = -1
        self.jobs: dict[int, list[list]] = {}
        self.marks = None
        if self.on:
            kill_hook(quantizer.i)

    def _lists(self):
        e = self.lq.e
        return [e.modules, e.super_weights, e.warnings, e.notes]

    def _close(self):
        if self.marks is not None:
            self.jobs[self.seq] = [lst[m:] for lst, m in zip(self._lists(), self.marks)]
            for lst, m in zip(self._lists(), self.marks):
                del lst[m:]
            self.marks = None

    def _open(self, owner: int) -> bool:
        if not self.on:
            return True
        self._close()
        self.seq += 1
        if owner != _S.rank:
            return False
        self.marks = [len(lst) for lst in self._lists()]
        return True

    def begin(self, x: int) -> bool:
        return self._open(x % _S.world)

    def solve(self, which: str, jobs: list[dict]) -> None:
        """The batched GPTQ of one matrix kind (LayerQuantizer._solve_batched) on this rank's experts; each job's
        records are set aside under the place the job has in the one-process order (grouped by (bits, shared
        Hessian) in order of first appearance, then by expert), so rank 0 can put the report back in that order."""
        if not self.on:
            self.lq._solve_batched(which, jobs, self.inter)
            return
        self._close()
        kinds = {}
        for job in jobs:
            kinds.setdefault((job["bits"], job["shared"]), len(kinds))
        ordered = sorted(jobs, key=lambda j: (kinds[(j["bits"], j["shared"])], j["x"]))
        seq_of = {job["name"]: self.seq + 1 + k for k, job in enumerate(ordered)}
        self.seq += len(ordered)
        mine = [job for job in jobs if job["x"] % _S.world == _S.rank]
        marks = [len(lst) for lst in self._lists()]
        self.lq._solve_batched(which, mine, self.inter)
        first = seq_of[mine[0]["name"]] if mine else None
        for slot, (lst, m) in enumerate(zip(self._lists(), marks)):
            for entry in lst[m:]:
                seq = seq_of.get(_job_name(entry), first)
                self.jobs.setdefault(seq, [[], [], [], []])[slot].append(entry)
            del lst[m:]

    def finish(self) -> None:
        if not self.on:
            return
        self._close()
        from .quant.hessian import expert_weights

        solved = self.lq.solved
        mine = sorted(solved)
        meta = [(x, which, solved[(x, which)].spec, tuple(solved[(x, which)].q.shape),
                 tuple(solved[(x, which)].scale.shape), solved[(x, which)].scale.dtype,
                 solved[(x, which)].zero is not None) for x, which in mine]
        everyone = all_gather_objects((meta, {} if is_main() else self.jobs))
        where = expert_weights(self.experts, 0)[0].device
        for owner, (units, _) in enumerate(everyone):
            sizes = [_unit_bytes(u) for u in units]
            if not units:
                continue
            if owner == _S.rank:
                buf = torch.cat([_pack(solved[(u[0], u[1])]) for u in units])
            else:
                buf = torch.empty(sum(sizes), dtype=torch.uint8, device=where)
            buf = broadcast_bytes(buf, owner)
            if owner == _S.rank:
                continue
            offset = 0
            for u, size in zip(units, sizes):
                x, which, spec, qshape, sshape, sdtype, has_zero = u
                qt = _unpack(buf[offset: offset + size], spec, qshape, sshape, sdtype, has_zero)
                offset += size
                gate_up, down = expert_weights(self.experts, x)
                W = gate_up if which == "gate_up" else down
                W.copy_(qt.dequantize().float())
                if is_main():
                    self.lq._store(x, which, qt, self.inter)
        if is_main():
            jobs = dict(self.jobs)
            for _, other in everyone[1:]:
                jobs.update(other)
            for seq in sorted(jobs):
                for lst, part in zip(self._lists(), jobs[seq]):
                    lst.extend(part)


def _job_name(entry) -> str | None:
    """The matrix a report entry is about: a module record, a super weight, or a warning 'NAME: reason'."""
    if isinstance(entry, dict):
        return entry.get("name", entry.get("module"))
    return entry.split(":", 1)[0] if isinstance(entry, str) else None


def _unit_bytes(u) -> int:
    _, _, _, qshape, sshape, sdtype, has_zero = u
    q = qshape[0] * qshape[1]
    s = sshape[0] * sshape[1]
    return q + s * torch.empty(0, dtype=sdtype).element_size() + (s if has_zero else 0)


def _pack(qt) -> torch.Tensor:
    parts = [qt.q, qt.scale] + ([qt.zero] if qt.zero is not None else [])
    return torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in parts])


def _unpack(buf, spec, qshape, sshape, sdtype, has_zero):
    from .quant.rtn import Quantized

    nq = qshape[0] * qshape[1]
    ns = sshape[0] * sshape[1] * torch.empty(0, dtype=sdtype).element_size()
    q = buf[:nq].clone().view(torch.int8).reshape(qshape)
    scale = buf[nq: nq + ns].clone().view(sdtype).reshape(sshape)
    zero = buf[nq + ns:].clone().view(torch.int8).reshape(sshape) if has_zero else None
    return Quantized(q, scale, zero, spec)


# ----------------------------------------------------------------------------------------------------------------
# writing: rank 0 only


class NullWriter:
    """What ranks other than 0 hold instead of a CheckpointWriter: the same checks and dtype, no file written."""

    def __init__(self, src, out, config, force: bool = False):
        from .export.writer import CheckpointWriter, check_output_path

        check_output_path(src.path, out, force)
        self.src, self.out = src, out
        self.dtype = CheckpointWriter._source_dtype(self)

    def add(self, *a, **k):
        pass

    add_module = add_outside_layers = add

    def finish(self, extra_files=None):
        return self.out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
