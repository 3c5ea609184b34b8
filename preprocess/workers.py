"""Run one function over many tasks in worker processes that may crash or hang.

Each worker holds at most two tasks and runs them in order, so the parent always knows which task a
worker is on:

- a worker that dies (an FFmpeg segfault, an out-of-memory kill) gives ``Failed("decoder crashed ...")``
  for the task it held and is replaced; the other workers and their tasks go on;
- a task that runs past the time limit gives ``Failed(...)`` naming the limit, and its worker is killed
  (SIGKILL) and replaced: nothing hangs.

Results come back in task order, whatever the number of workers.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.connection import wait

_READY = "ready"

# Test-only hooks (tests/preprocess/test_protect.py): a worker that is given the video of this file name
# kills itself with SIGSEGV (as an FFmpeg crash would) or hangs (as a stuck decoder would) until it is
# killed. They act only when FAULT_INJECTION=1 is set too, so a stray variable cannot harm a real run.
# Read by the packing process when it starts its workers (whose environment may be older: forkserver).
TEST_CRASH_ON = "PREPROCESS_TEST_CRASH_ON"
TEST_HANG_ON = "PREPROCESS_TEST_HANG_ON"
FAULT_INJECTION = "PREPROCESS_FAULT_INJECTION"
_hooks: dict[str, str] = {}  # in a worker: the hooks its packing process passed on


def _test_hooks() -> dict[str, str]:
    if os.environ.get(FAULT_INJECTION) != "1":
        return {}
    return {name: os.environ[name] for name in (TEST_CRASH_ON, TEST_HANG_ON) if os.environ.get(name)}


def apply_test_hooks(file_name: str) -> None:
    """Test-only: crash or hang this worker process when ``file_name`` is the one a hook names."""
    if file_name == _hooks.get(TEST_CRASH_ON):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        os.kill(os.getpid(), signal.SIGSEGV)
    if file_name == _hooks.get(TEST_HANG_ON):
        parent = os.getppid()  # the packer, or the forkserver, which exits with it
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(1)


@dataclass(frozen=True)
class Failed:
    """A task that gave no result; ``reason`` says why (fit for a skip report)."""

    reason: str


def _serve(conn, fn: Callable, init: Callable, init_args: tuple, hooks: dict[str, str]) -> None:
    """Worker process: run ``fn`` on each task received until the parent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    _hooks.update(hooks)
    init(*init_args)
    try:
        conn.send(_READY)
        while (task := conn.recv()) is not None:
            conn.send(fn(*task))
    except (EOFError, OSError):  # the parent is gone (killed): nothing to report to
        return


class _Worker:
    """A worker process and the tasks it holds, in the order it runs them (the first is the one it is on)."""

    DEPTH = 2  # tasks held: the next one is there as soon as a result is sent, so the worker never waits

    def __init__(self, ctx, fn: Callable, init: Callable, init_args: tuple):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, init, init_args, _test_hooks()), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.gone = False  # found dead while handing it a task
        self.held: deque[int] = deque()  # positions of the tasks given and not answered yet
        self.deadline = 0.0  # when the task it is on runs out of time

    @property
    def pos(self) -> int | None:
        """The task it is on."""
        return self.held[0] if self.held else None

    def give(self, pos: int, task: tuple, timeout: float) -> bool:
        """Hand over a task; False when the worker is gone already (its death is collected next)."""
        try:
            self.conn.send(task)
        except OSError:  # BrokenPipeError: it died since it was last heard of
            self.gone = True
            return False
        if not self.held:
            self.deadline = time.monotonic() + timeout
        self.held.append(pos)
        return True

    def answered(self, timeout: float) -> int:
        """The task it was on is done: its position; the clock starts for the next one."""
        self.deadline = time.monotonic() + timeout
        return self.held.popleft()

    def death(self) -> str:
        """How the process ended, e.g. ``killed by SIGSEGV``."""
        self.proc.join(5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def stop(self, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()


def run_guarded(fn: Callable, tasks: Sequence[tuple], workers: int, timeout: float, init: Callable,
                init_args: tuple = ()) -> Iterator:
    """``fn(*task)`` for each task, in order, from ``workers`` processes started with ``init(*init_args)``;
    a task that crashed its worker or ran past ``timeout`` seconds gives a ``Failed``. A worker runs its
    tasks in order, so the one it died on is the first it held; the others it held are given out again."""
    # forkserver where there is one: workers fork from a clean server process that has imported the packer
    # (NumPy, OpenCV) once per packing process, so after the first start a worker starts in ~1 ms instead of
    # ~0.3 s with spawn (measured here; a third of the time of a 30-video folder with one worker). Plain fork
    # would be as fast but copies whatever locks the calling process holds (OpenCV's thread pool, once it
    # has decoded anything: seen to deadlock a worker).
    ctx = get_context("forkserver" if "forkserver" in get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["preprocess.shard"])
    done: dict[int, object] = {}
    again: list[int] = []  # tasks of a crashed worker that it had not started
    window = 4 * workers  # results held ahead of the one awaited: bounds memory
    pool = [_Worker(ctx, fn, init, init_args) for _ in range(min(workers, len(tasks)))]
    next_in = next_out = 0
    try:
        while next_out < len(tasks):
            for w in pool:
                while (w.ready and not w.gone and len(w.held) < w.DEPTH
                       and (again or next_in < min(len(tasks), next_out + window))):
                    pos = again.pop(0) if again else next_in
                    next_in += pos == next_in
                    if not w.give(pos, tasks[pos], timeout):
                        again = sorted(again + [pos])
            _wait(pool)
            for i, w in enumerate(pool):
                if _collect(w, done, timeout):  # gone: replaced while tasks are left to give out
                    again = sorted(again + list(w.held))
                    pool[i] = _Worker(ctx, fn, init, init_args) if next_in < len(tasks) or again else None
            pool = [w for w in pool if w is not None]
            while next_out in done:
                result = done.pop(next_out)
                next_out += 1
                yield result
    finally:
        for w in pool:
            w.stop(kill=next_out < len(tasks))  # idle workers are asked to stop, busy ones killed


def _wait(pool: list[_Worker]) -> None:
    """Block until a worker answers or dies, or the nearest deadline passes."""
    busy = [w.deadline for w in pool if w.pos is not None]
    timeout = max(0.0, min(busy) - time.monotonic()) if busy else None
    wait([w.conn for w in pool] + [w.proc.sentinel for w in pool], timeout)


def _collect(w: _Worker, done: dict, timeout: float) -> bool:
    """Take what worker ``w`` has to give; True when it is gone (died or was killed) and must be replaced.
    The task it was on gets its ``Failed``; the tasks it held after that stay in ``w.held``."""
    try:
        while w.conn.poll():
            msg = w.conn.recv()
            if msg == _READY and not w.ready:
                w.ready = True
            else:
                done[w.answered(timeout)] = msg
        if w.proc.is_alive():
            if w.pos is None or time.monotonic() < w.deadline:
                return False
            w.proc.kill()
            done[w.held.popleft()] = Failed(f"took longer than the --video-timeout of {timeout:g} s; its worker "
                                            "was stopped")
            w.stop(kill=True)
            return True
    except (EOFError, OSError):
        pass  # died: the pipe closed
    how = w.death()
    if w.pos is None:
        if not w.ready:
            raise RuntimeError(f"a worker process failed to start ({how}); see the error above")
        return True
    done[w.held.popleft()] = Failed(f"decoder crashed: the worker process died ({how}) on this video")
    w.stop(kill=True)
    return True
