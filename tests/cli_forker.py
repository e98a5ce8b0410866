"""``imageshare ARGS`` as the command line runs it, without paying Python's start-up and the
archive's imports (about 1.2 s of CPU) for every call: one process per test worker imports
the CLI once and forks a child per command. Each child is a new process with its own
environment, standard streams and exit code, as ``python -m imageshare`` would be; the
forking process has a single thread, so a child inherits no lock held by another thread.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Runs in the forking process: reads one request a line, forks, reports the child's pid and
# then its exit code.
_FORKER = r"""
import json, os, sys
import imageshare.app, imageshare.cli  # the imports every command pays for
requests, replies = sys.stdin.buffer, sys.stdout.buffer
def reply(**message):
    replies.write(json.dumps(message).encode() + b"\n")
    replies.flush()
for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.environ.clear()
            os.environ.update(request["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            out = os.open(request["out"], os.O_WRONLY | os.O_TRUNC)
            err = os.open(request["err"], os.O_WRONLY | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            sys.argv = ["imageshare", *request["args"]]
            try:
                code = imageshare.cli.main(request["args"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)
    reply(pid=pid)
    _, status = os.waitpid(pid, 0)
    reply(code=os.waitstatus_to_exitcode(status))
"""

_lock = threading.Lock()
_forker: subprocess.Popen[bytes] | None = None


def _started() -> subprocess.Popen[bytes]:
    global _forker
    if _forker is None or _forker.poll() is not None:
        _forker = subprocess.Popen([sys.executable, "-c", _FORKER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, env=dict(os.environ))
        atexit.register(_forker.kill)
    return _forker


def _reply(forker: subprocess.Popen[bytes], timeout: float | None) -> dict | None:
    """The forking process's next message; None when none came within ``timeout``."""
    assert forker.stdout is not None
    ready, _, _ = select.select([forker.stdout], [], [], timeout)
    if not ready:
        return None
    line = forker.stdout.readline()
    if not line:
        raise RuntimeError("the process running imageshare commands for the tests ended")
    return json.loads(line)


def run_cli(args: list[str], env: dict[str, str], check: bool = True,
            timeout: float | None = 300) -> subprocess.CompletedProcess[str]:
    """``imageshare ARGS`` in a process of its own with ``env``: its exit code and output, as
    :func:`subprocess.run` gives them (CalledProcessError with ``check``, TimeoutExpired
    after ``timeout`` seconds, when the command is killed)."""
    command = [sys.executable, "-m", "imageshare", *args]
    with _lock, tempfile.TemporaryDirectory(prefix="imageshare-cli-") as folder:
        out, err = Path(folder) / "out", Path(folder) / "err"
        out.touch()
        err.touch()
        forker = _started()
        assert forker.stdin is not None
        forker.stdin.write(json.dumps({"args": list(args), "env": env, "out": str(out),
                                       "err": str(err)}).encode() + b"\n")
        forker.stdin.flush()
        started = _reply(forker, 60)
        if started is None:
            raise RuntimeError("the process running imageshare commands does not answer")
        ended = _reply(forker, timeout)
        if ended is None:
            os.kill(started["pid"], signal.SIGKILL)
            _reply(forker, 60)
            raise subprocess.TimeoutExpired(command, timeout or 0, out.read_text(),
                                            err.read_text())
        done = subprocess.CompletedProcess(command, ended["code"], out.read_text(),
                                           err.read_text())
    if check:
        done.check_returncode()
    return done
