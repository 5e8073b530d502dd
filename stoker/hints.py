"""Checkpoint and step hints from a training job to the Stoker agent on its node.

Standard library only, so a training environment can import it without the
agent's dependencies. A hint that cannot be delivered is logged and dropped:
telemetry must never break a training run.

    from stoker.hints import checkpoint, step

    for n, batch in enumerate(loader, start=1):
        ...
        optimizer.step()
        step(n, tokens=4 << 20)          # under a microsecond; never blocks, never raises

    with checkpoint(path="/mnt/checkpoints/run7/step1200", expected_bytes=16 << 30):
        torch.save(state, "/mnt/checkpoints/run7/step1200/rank0.pt")

`step()` only appends to a bounded queue; a background thread (started at the
first step) sends the steps in batches every second. When the agent is away
or refuses them they are dropped, with one warning, and tried again later;
when the queue is full (the agent away for long) the newest are dropped. Only
the node's local rank 0 reports by default (`LOCAL_RANK`, `SLURM_LOCALID`,
...): every rank of a synchronous job takes the same steps. Framework
callbacks: `stoker.hints_adapters` (docs/JOBS.md).

The token comes from `token=`, else $STOKER_HINT_TOKEN, else the file named by
`token_file=` or $STOKER_HINT_TOKEN_FILE (default /etc/stoker/hint-token), less
one trailing newline, as the agent reads its file; it must be printable ASCII
without spaces (HTTP drops the spaces around a header's value, so a token with
them could not be told from one without). The agent is at `url=`, else
$STOKER_HINT_URL (default http://127.0.0.1:9478). The job's steps are counted
for $STOKER_JOB_ID, else $SLURM_JOB_ID, else the job of the sending process
(docs/JOBS.md: which job wins).
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from stoker.sources.files import Refused, Unanswered, read_operator_file, shown  # standard library only, too

DEFAULT_URL = "http://127.0.0.1:9478"
DEFAULT_TOKEN_FILE = "/etc/stoker/hint-token"
TOKEN_FILE_LIMIT = 1 << 20  # bytes: the agent's cap on the same file (config.MAX_FILE_BYTES)

log = logging.getLogger("stoker.hints")


class HintFailed(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _token(token: str | None, token_file: str | None, timeout: float = 2.0) -> str:
    """The token by the agent's rule: the text less one trailing newline, then exactly that.

    A token file is read as the agent reads it (files.read_regular_within): only a regular file,
    opened without blocking (a FIFO blocked the training step that sent a checkpoint hint, and
    `stoker checkpoint`, for good), at most TOKEN_FILE_LIMIT bytes, given up after `timeout` (a
    file on a hung NFS mount)."""
    where = "token=" if token else "$STOKER_HINT_TOKEN"
    value = token or os.environ.get("STOKER_HINT_TOKEN")
    if not value:
        where = token_file or os.environ.get("STOKER_HINT_TOKEN_FILE", DEFAULT_TOKEN_FILE)
        try:
            value = read_operator_file(where, TOKEN_FILE_LIMIT, timeout)
        except Unanswered as exc:
            raise HintFailed(f"cannot read the hint token from {shown(where)}: {exc.strerror}") from None
        except Refused as exc:
            raise HintFailed(f"cannot read the hint token from {shown(where)}: {exc}") from None
    value = value.removesuffix("\n")
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise HintFailed(f"the hint token from {where} must be printable ASCII without spaces, "
                         "one trailing newline at most")
    return value


def send(action: str, body: dict, url: str | None = None, token: str | None = None,
         token_file: str | None = None, timeout: float = 2.0) -> dict:
    """POST one hint; raises `HintFailed` with the agent's message when it is refused."""
    return _post(f"/api/v1/checkpoints/{action}", body, url, token, token_file, timeout)


MAX_ANSWER = 64 * 1024
"""The agent answers a hint in under a hundred bytes."""


def _post(path: str, body: dict, url: str | None = None, token: str | None = None,
          token_file: str | None = None, timeout: float = 2.0) -> dict:
    """POST `body` and read the answer, at most MAX_ANSWER bytes, within `timeout` seconds in all.

    Whoever listens on the hint port answers (any local user, while the agent does not hold it), and a
    socket timeout bounds each read, not the answer: an endless body took a training process to 1.8 GB
    in 6 s, a trickled one held a checkpoint's `with` for as long as it liked, and a body that was not
    JSON raised out of the training code. So the connection is shut down at the deadline, the answer is
    capped, and everything that goes wrong is HintFailed."""
    base = (url or os.environ.get("STOKER_HINT_URL") or DEFAULT_URL).rstrip("/")
    request = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {_token(token, token_file, timeout)}"})
    sockets: list[socket.socket] = []
    deadline = threading.Timer(timeout, _shut, (sockets,))
    deadline.daemon = True
    deadline.start()
    try:
        with _opener(sockets).open(request, timeout=timeout) as resp:
            answer = resp.read(MAX_ANSWER + 1)
        if len(answer) > MAX_ANSWER:
            raise HintFailed(f"the answer from {base} is larger than {MAX_ANSWER} bytes: not the agent's")
        found = json.loads(answer or b"{}")
        if not isinstance(found, dict):
            raise ValueError("not a JSON object")
        return found
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read(MAX_ANSWER)).get("error", exc.reason)
        except (ValueError, AttributeError, OSError, http.client.HTTPException):
            message = exc.reason
        raise HintFailed(f"the agent refused the hint: {message}", exc.code) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise HintFailed(f"cannot reach the agent at {base}: {exc}") from None
    except ValueError as exc:  # not JSON, not UTF-8
        raise HintFailed(f"the answer from {base} is not the agent's: {exc}") from None
    finally:
        deadline.cancel()


def _opener(sockets: list[socket.socket]) -> urllib.request.OpenerDirector:
    """urllib, with each connection's socket put in `sockets` as it connects (for `_shut`)."""
    def recorded(base: type) -> type:
        class Connection(base):
            def connect(self) -> None:
                super().connect()
                sockets.append(self.sock)
        return Connection

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(recorded(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(recorded(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(Http, Https)


def _shut(sockets: list[socket.socket]) -> None:
    """The deadline: a read blocked in the socket returns at once (close() would not wake it)."""
    for sock in list(sockets):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _target(path: str | None, mountpoint: str | None) -> dict:
    return {"mountpoint": mountpoint} if mountpoint else {"path": path}


def start(path: str | None = None, mountpoint: str | None = None, expected_bytes: int | None = None,
          **kwargs) -> dict:
    body = _target(path, mountpoint)
    if expected_bytes is not None:
        body["expected_bytes"] = expected_bytes
    return send("start", body, **kwargs)


def end(path: str | None = None, mountpoint: str | None = None, outcome: str = "completed", **kwargs) -> dict:
    return send("end", {**_target(path, mountpoint), "outcome": outcome}, **kwargs)


@contextmanager
def checkpoint(path: str | None = None, mountpoint: str | None = None, expected_bytes: int | None = None,
               **kwargs) -> Iterator[None]:
    """Wrap a checkpoint save: `completed` when the block returns, `aborted` when it raises."""
    try:
        start(path, mountpoint, expected_bytes, **kwargs)
    except HintFailed as exc:
        log.warning("stoker: checkpoint start hint not delivered: %s", exc)
    outcome = "aborted"
    try:
        yield
        outcome = "completed"
    finally:
        try:
            end(path, mountpoint, outcome, **kwargs)
        except HintFailed as exc:
            log.warning("stoker: checkpoint end hint not delivered: %s", exc)


# -- training steps ------------------------------------------------------------------------------

FLUSH_EVERY = 1.0  # seconds between batches
MAX_PENDING = 10_000  # steps kept while the agent does not answer: 10 minutes at 16 steps a second
BATCH = 128  # steps per request (the agent takes at most 16 KiB of body)
RETRY_FIRST, RETRY_CAP = 5.0, 300.0
MAX_NODES = 100_000  # the agent refuses more (stoker/exporters/hints.py)
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def _job_from_environment() -> tuple[str | None, str | None]:
    """(job id, scheduler): $STOKER_JOB_ID, else Slurm's job id; else the agent works it out."""
    if os.environ.get("STOKER_JOB_ID"):
        return os.environ["STOKER_JOB_ID"], None
    if os.environ.get("SLURM_JOB_ID", "").isdigit():
        return os.environ["SLURM_JOB_ID"], "slurm"
    return None, None


def _run_from_environment() -> str:
    """What identifies this launch of the job, the same for all its ranks where the launcher says so."""
    env = os.environ
    if env.get("STOKER_RUN_ID"):
        return env["STOKER_RUN_ID"]
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchelastic:{env['TORCHELASTIC_RUN_ID']}.{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}.{env.get('SLURM_RESTART_COUNT', '0')}"
    return f"pid:{os.getpid()}.{time.time_ns()}"


def _gpus_from_environment() -> list[str]:
    """GPU UUIDs the launcher gave this process (Kubernetes' device plugin sets NVIDIA_VISIBLE_DEVICES
    to UUIDs); indexes are left out: CUDA's order need not be NVML's."""
    for key in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        uuids = [d.strip() for d in os.environ.get(key, "").split(",") if d.strip().startswith(("GPU-", "MIG-"))]
        if uuids:
            return uuids[:64]
    return []


def _nodes_from_environment() -> int | None:
    """The nodes the job spans, as its launcher says: torchrun's WORLD_SIZE over LOCAL_WORLD_SIZE, Slurm's
    SLURM_STEP_NUM_NODES (srun) or SLURM_JOB_NUM_NODES, Open MPI's world over its local size."""
    def count(key: str) -> int:
        value = os.environ.get(key, "")
        return int(value) if value.isdigit() and len(value) <= 9 else 0

    counts = [-(-count(world) // count(local)) for world, local in (
        ("WORLD_SIZE", "LOCAL_WORLD_SIZE"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")) if count(local)]
    counts += [count("SLURM_STEP_NUM_NODES"), count("SLURM_JOB_NUM_NODES")]
    return next((n for n in counts if 0 < n <= MAX_NODES), None)


def _local_rank() -> int:
    for key in LOCAL_RANK_VARIABLES:
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


_reporters: weakref.WeakSet = weakref.WeakSet()


def _after_fork() -> None:
    """A forked child (a data loader worker) has the parent's reporters but not their threads."""
    for reporter in list(_reporters):
        reporter._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class Steps:
    """Reports a job's training steps to the agent. `step()` costs under a microsecond and never
    blocks or raises: it appends to a bounded queue that a background thread sends every second.

    `job`: the job's id as the agent should know it (default $STOKER_JOB_ID, else $SLURM_JOB_ID,
    else the agent finds the job from this process or the node's only job; the agent refuses a job
    other than the scheduler's for a process it sees, docs/JOBS.md); `run`: this launch of
    it (default from torchrun or Slurm, else this process); `gpus`: the GPU UUIDs it uses (default
    from NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES when they are UUIDs); `all_ranks`: report
    from every local rank (only with a `run` the ranks share), not only local rank 0; `nodes`: the
    nodes the job spans (default from torchrun, Slurm or Open MPI), which tells the agent that its
    GPUs may wait for other nodes (docs/VERDICTS.md, "Peer").

    Data wait: the time a step waited for its next batch, given to `step()` or added up between two
    steps by `waited()` (the adapters time the data loader with it).
    """

    def __init__(self, job: str | None = None, run: str | None = None, gpus: list[str] | None = None,
                 url: str | None = None, token: str | None = None, token_file: str | None = None,
                 flush_every: float = FLUSH_EVERY, max_pending: int = MAX_PENDING, all_ranks: bool = False,
                 timeout: float = 2.0, nodes: int | None = None):
        env_job, scheduler = _job_from_environment()
        self.job = job if job is not None else env_job
        self.scheduler = scheduler if job is None else None
        self.run = run or _run_from_environment()
        self.gpus = list(gpus) if gpus is not None else _gpus_from_environment()
        self.nodes = nodes if nodes is not None else _nodes_from_environment()
        self._waited = 0.0  # data wait since the last step (`waited`)
        self.enabled = all_ranks or _local_rank() == 0
        self.sent = self.dropped = 0
        self._url, self._token, self._token_file, self._timeout = url, token, token_file, timeout
        self._flush_every = flush_every
        self._max = max_pending
        self._pending: deque = deque()
        self._last: float | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._retry_at = 0.0
        self._delay = RETRY_FIRST
        self._warned: set[str] = set()
        _reporters.add(self)

    def waited(self, seconds: float) -> None:
        """The step under way waited this long for a batch (added up until the next `step()`)."""
        self._waited += seconds

    def step(self, step: int, tokens: int | None = None, samples: int | None = None,
             seconds: float | None = None, data_wait: float | None = None) -> None:
        """Step `step` is done. `tokens`, `samples`: of the whole step (the global batch); `seconds`: its
        duration, by default the time since the previous call (the first call has none); `data_wait`: of
        that, the time it waited for its batches, by default what `waited()` added up since."""
        waited, self._waited = self._waited, 0.0
        if not self.enabled:
            return
        now = time.monotonic()
        last, self._last = self._last, now
        if seconds is None and last is not None:
            seconds = now - last
        if data_wait is None and waited:
            data_wait = waited
        if len(self._pending) >= self._max:
            self.dropped += 1
            self._warn_once("full", "stoker: the step queue is full (the agent does not answer); "
                                    "dropping steps until it does")
            return
        self._pending.append((step, seconds, tokens, samples, data_wait))
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._serve, name="stoker-steps", daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def _forked(self) -> None:
        self._thread, self._start_lock, self._wake = None, threading.Lock(), threading.Event()
        self._pending.clear()

    def _serve(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_every)
            self._flush()

    def flush(self) -> None:
        """Send what is pending now, in the background thread (it does not wait)."""
        self._wake.set()

    def _disable(self, why: str) -> None:
        """Nothing will ever be accepted (no token, the wrong one): stop collecting."""
        self.enabled = False
        self.dropped += len(self._pending)
        self._pending.clear()
        self._warn_once("disabled", f"stoker: step hints disabled: {why}")

    def _flush(self, final: bool = False) -> None:
        self._wake.clear()
        if not self._pending or (not final and time.monotonic() < self._retry_at):
            return
        try:
            token = _token(self._token, self._token_file, self._timeout)
        except HintFailed as exc:
            self._disable(str(exc))
            return
        while self._pending and (final or not self._closed):
            batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            body = {"steps": [s for s in map(_step_body, batch) if s is not None], "run": self.run,
                    "pid": os.getpid()}
            for key, value in (("job", self.job), ("scheduler", self.scheduler), ("gpus", self.gpus),
                               ("nodes", self.nodes)):
                if value:
                    body[key] = value
            try:
                if body["steps"]:
                    _post("/api/v1/steps", body, self._url, token, None, self._timeout)
            except HintFailed as exc:
                self.dropped += len(batch)
                if exc.status == 401:
                    self._disable(str(exc))
                    return
                self._warn_once("send", f"stoker: step hints not delivered, dropped until the agent takes them: {exc}")
                self._retry_at = time.monotonic() + self._delay
                self._delay = min(2 * self._delay, RETRY_CAP)
                return
            except Exception as exc:  # never let the thread die on something unexpected
                self.dropped += len(batch)
                self._warn_once("bug", f"stoker: step hints not delivered: {type(exc).__name__}: {exc}")
                return
            self.sent += len(body["steps"])
            self.dropped += len(batch) - len(body["steps"])
            self._delay = RETRY_FIRST

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def close(self, timeout: float = 1.0) -> None:
        """Send what is pending, waiting at most `timeout` seconds in all, and stop the thread."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        thread, self._closed, self.enabled = self._thread, True, False
        self._wake.set()
        if thread is not None and thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))
            flusher = threading.Thread(target=self._flush, args=(True,), name="stoker-steps-final", daemon=True)
            flusher.start()
            flusher.join(max(0.0, deadline - time.monotonic()))


def _step_body(item: tuple) -> dict | None:
    """One queued step as JSON; numbers that are not (a tensor, a NaN) drop the step, not the batch."""
    n, seconds, tokens, samples, data_wait = item
    try:
        out = {"step": int(n)}
        for key, value in (("seconds", seconds), ("data_wait", data_wait)):
            if value is not None and 0 <= float(value) < float("inf"):
                out[key] = round(float(value), 6)
        for key, value in (("tokens", tokens), ("samples", samples)):
            if value is not None and int(value) >= 0:
                out[key] = int(value)
        return out if out["step"] >= 0 else None
    except (TypeError, ValueError, OverflowError):
        return None


_default: Steps | None = None
_default_lock = threading.Lock()


def default_steps() -> Steps:
    """The process's `Steps`, made at the first call from the environment."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Steps()
    return _default


def step(step: int, tokens: int | None = None, samples: int | None = None, seconds: float | None = None,
         data_wait: float | None = None) -> None:
    """Report a training step through the process's default `Steps`."""
    (_default or default_steps()).step(step, tokens, samples, seconds, data_wait)
