"""Job attribution for the verdict collector: the GPU processes' owners, read in a worker thread.

The verdicts run right after each GPU cycle; before they judge, the PIDs NVML
reported are looked up (sources/jobs.py) in a thread of their own with a
deadline, and only when there is something to read: a PID not seen before, or
one due for another try. Most ticks read nothing and do not leave the loop. A
lookup that outlives its deadline (an `environ` read blocked behind a process
stuck on a hung NFS mount) fails alone: the accounting keeps the owners it
knew, and later ticks fail at once (`hung`) until the thread is free again.
"""

from __future__ import annotations

from stoker import logs
from stoker.agent.worker import CollectorError, Worker
from stoker.sources.gpu import GpuSnapshot
from stoker.sources.jobs import JobSnapshot, JobSource

log = logs.get("jobs")


class JobAttributor:
    def __init__(self, source: JobSource, timeout: float = 2.0):
        self.source = source
        self.timeout = timeout
        self.snapshot = JobSnapshot({})
        self._worker = Worker("jobs")
        self._gate = logs.RepeatGate()

    async def refresh(self, gpu: GpuSnapshot | None) -> JobSnapshot:
        """The owners of the PIDs on the GPUs now (those of the last lookup while NVML does not answer)."""
        if gpu is None:
            return self.snapshot
        pids = frozenset(p for g in gpu.gpus if g.up for p in g.pids)
        if pids == frozenset(self.snapshot.owners) and not self.source.due(pids):
            return self.snapshot
        try:
            self.snapshot = await self._worker.call(self.source.resolve, pids, timeout=self.timeout)
        except Exception as exc:  # a timeout, a hung read, or a bug: the verdicts go on without new owners
            reason = exc.reason if isinstance(exc, CollectorError) else type(exc).__name__
            if self._gate.admit(("lookup",), reason) is not None:
                log.warning("job attribution failed; keeping the last owners", reason=reason, error=str(exc),
                            exc_info=not isinstance(exc, CollectorError))
            return self.snapshot
        self._gate.clear(("lookup",))
        for problem in self.snapshot.problems:
            if self._gate.admit(("problem", problem), problem) is not None:
                log.warning("job attribution incomplete", problem=problem)
        return self.snapshot

    def close(self) -> None:
        self._worker.close()
