"""Child processes forked from a warm one, for tests that start many Python command lines.

Each command line of this project pays ~1.5 CPU-s importing dagster, pyarrow, duckdb, deltalake and
the clients before it does anything, and the suite starts a few hundred (the fault matrix's redrive
processes, the crash tests' CLI runs, the CLI tests): on a 2-core machine, CPU is what the suite
waits for. `WarmPopen` is a `subprocess.Popen` whose child is forked from a server process that
has imported those libraries once (`PRELOAD`). The child is a real separate process with its own
pid, pipes, environment, working directory and (optionally) session: it can be waited for, read,
signalled and SIGKILLed as any other. It then runs the command's Python script (`python script.py
...`, `python -c ...` or a console script such as `.venv/bin/event-replay`) as `__main__`, as the
interpreter would have.

The server is started on first use, one per test process, and stopped when that process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import types
from pathlib import Path

# Imported once in the server: what this project's command lines import, but for the modules that
# read settings when imported (replay_defs.definitions and what it builds), which each child imports.
PRELOAD = (
    "dagster",
    "dagster._cli",
    "dagster._core.storage.event_log",
    "dagster._core.storage.runs",
    "pyarrow.compute",
    "pyarrow.dataset",
    "pyarrow.parquet",
    "duckdb",
    "deltalake",
    "boto3",
    "confluent_kafka",
    "msgspec",
    "psycopg",
    "redis",
    "pika",
    "replay_defs.core.lake",
    "replay_defs.core.ledger",
    "replay_defs.pipeline.delivery",
    "replay_defs.sinks.kafka",
    "replay_defs.sinks.outbox",
    "replay_defs.sinks.rabbitmq",
    "replay_defs.sinks.redis",
    "replay_defs.sinks.sqs",
)


# ---- server ---------------------------------------------------------------------------------


def _serve(path: str) -> None:
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    # SIGCHLD wakes the loop through a pipe; the loop reaps and reports each child's status.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    print("ready", flush=True)
    conns: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while True:
        readable, _, _ = select.select([listener, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = conns.pop(pid, None)
                if conn is not None:
                    try:
                        conn.sendall(f"{status}\n".encode())
                    except OSError:  # the client went away without waiting
                        pass
                    conn.close()
        if listener in readable:
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(msg)
            pid = os.fork()
            if pid == 0:
                listener.close()
                for c in conns.values():
                    c.close()
                os.close(wake_r)
                os.close(wake_w)
                _run_child(request, fds, conn)  # never returns
            for fd in fds:
                os.close(fd)
            conns[pid] = conn


def _run_child(request: dict, fds: list[int], conn: socket.socket) -> None:
    """In the forked child: set up as `Popen` would before its exec, tell the client its pid (as
    `Popen` returns once the exec happened), then run the script."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        if request["new_session"]:
            os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script, code_text, argv = request["script"], request["code"], request["argv"]
        # sys.path as the interpreter makes it: the script's directory ('' for -c), then PYTHONPATH.
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        first = "" if script is None else str(Path(script).resolve().parent)
        sys.path[:] = [first, *extra, *sys.path[1:]]
        sys.argv = ["-c" if script is None else script, *argv]
        sys.stdout.reconfigure(write_through=bool(os.environ.get("PYTHONUNBUFFERED")))
    except BaseException as exc:  # noqa: BLE001 - what Popen would raise in the parent
        conn.sendall(f"error {type(exc).__name__}: {exc}\n".encode())
        os._exit(127)
    conn.sendall(f"{os.getpid()}\n".encode())
    conn.close()
    code = 1
    try:
        try:
            if script is None:
                main = types.ModuleType("__main__")
                sys.modules["__main__"] = main
                exec(compile(code_text, "<string>", "exec"), main.__dict__)
            else:
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
                pass
        os._exit(code)


# ---- client ---------------------------------------------------------------------------------

_server: dict = {}
_lock = threading.Lock()


def _socket_path() -> str:
    with _lock:
        if _server.get("pid") != os.getpid():
            path = os.path.join(tempfile.mkdtemp(prefix="warm-"), "sock")
            proc = subprocess.Popen(
                [sys.executable, __file__, path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
            )
            assert proc.stdout.readline().strip() == "ready", "the warm process server did not start"
            atexit.register(_stop, proc, path)
            _server.update(pid=os.getpid(), path=path)
        return _server["path"]


def _stop(proc: subprocess.Popen, path: str) -> None:
    proc.kill()
    proc.wait()
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _command(args: list) -> dict:
    """`python script.py ARGS`, `python -c CODE ARGS` or a console script (a Python file) `ARGS`."""
    args = [str(a) for a in args]
    if not Path(args[0]).name.startswith("python"):
        return {"script": args[0], "code": None, "argv": args[1:]}
    if args[1] == "-c":
        return {"script": None, "code": args[2], "argv": args[3:]}
    assert not args[1].startswith("-"), f"only `python script` and `python -c` are forked warm, not {args[1]}"
    return {"script": args[1], "code": None, "argv": args[2:]}


class WarmPopen(subprocess.Popen):
    """`subprocess.Popen` for a Python command line, its child forked from the warm server."""

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest) -> None:
        (_, _, _, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite) = rest[:9]
        start_new_session = rest[-2]
        request = {
            **_command(list(args)),
            "cwd": str(cwd or os.getcwd()),
            "env": dict(os.environ if env is None else env),
            "new_session": bool(start_new_session),
        }
        # What the child gets as 0, 1, 2: the pipes Popen made, else this process's own.
        child_fds = [fd if fd != -1 else own for fd, own in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2))]
        self._warm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._warm.connect(_socket_path())
        socket.send_fds(self._warm, [json.dumps(request).encode()], child_fds)
        self._warm_buf = b""
        first = self._read_line()
        if first.startswith("error "):
            raise OSError(f"{args[0]}: {first[6:]}")
        self.pid = int(first)
        self._child_created = True
        for fd, keep in ((p2cread, p2cwrite), (c2pwrite, c2pread), (errwrite, errread)):
            if fd != -1 and keep != -1 and fd != getattr(self, "_devnull", None):
                os.close(fd)
        if hasattr(self, "_devnull"):
            os.close(self._devnull)
        self._closed_child_pipe_fds = True

    def _read_line(self, block: bool = True) -> str | None:
        while b"\n" not in self._warm_buf:
            if not block and not select.select([self._warm], [], [], 0)[0]:
                return None
            data = self._warm.recv(4096)
            if not data:
                raise RuntimeError("the warm process server went away")
            self._warm_buf += data
        line, self._warm_buf = self._warm_buf.split(b"\n", 1)
        return line.decode()

    def _try_wait(self, wait_flags):
        line = self._read_line(block=not wait_flags & os.WNOHANG)
        return (0, 0) if line is None else (self.pid, int(line))

    def _internal_poll(self, _deadstate=None, **_):
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                pid, status = self._try_wait(os.WNOHANG)
                if pid == self.pid:
                    self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode

    def _handle_exitstatus(self, sts, *args, **kwargs):
        super()._handle_exitstatus(sts, *args, **kwargs)
        self._warm.close()  # the server has said all it will about this child


def run(args, *, input=None, timeout=None, check=False, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` with a `WarmPopen`."""
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with WarmPopen(args, stdin=subprocess.PIPE if input is not None else kwargs.pop("stdin", None), **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


if __name__ == "__main__":
    _serve(sys.argv[1])
