"""A warm process for sweep trials: DVC, torch, transformers and the distill stage imported once, each trial forked.

A trial is two processes that would each spend most of their time starting: ``dvc exp run``
imports ~1,300 modules (~0.6 s) before it copies a file, and its stage, ``kdsweep distill``,
spends seconds importing torch and transformers before it reads a byte. The runner starts one
*zygote* per study run (``python -m kdsweep.warm SOCKET``) that imports all of that once and
then waits on a Unix socket (it forks a handler per connection, so one zygote serves every
worker slot at once); both commands become thin clients that hand their whole process over::

    client (`python -m kdsweep.warmdvc exp run ...`, which the runner starts in place of `dvc`;
            `kdsweep distill`, which DVC starts; neither imports DVC or torch):
        connect to $KDSWEEP_WARM            (unset, or nothing listening: run in-process as always;
                                             DVC's client also when the zygote is still importing)
        send the entry point, cwd, argv, environment, pid and its stdin/stdout/stderr (SCM_RIGHTS)
        SIGTERM/SIGINT -> send the signal number over the socket
        wait for the exit status; exit with it (a child killed by a signal: kill itself with it)
    zygote, per connection: fork a handler, which
        forks the trial: a process group of its own, chdir, environment, dup2 of the client's
            fds, OpenMP threads from OMP_NUM_THREADS, then the entry point's `main()`
            (`kdsweep.cli` or `dvc.cli`) with the client's argv
        relays the client's signals to the trial's process group (DVC and the stage it runs, as
            a Ctrl-C in a terminal would); the client gone (killed, socket hung up): SIGKILL it
        sends the trial's exit status back

Nothing in the zygote starts a thread or touches CUDA before it forks: the OpenMP pool and the
CUDA context are made in the trial, as in a cold process, so a forked trial computes exactly
what a cold one does (``tests/test_warm.py`` compares their metrics bit for bit). The
environment is the trial's own from the fork on; only what libraries read when imported is the
zygote's (the runner starts it with its own environment, which every trial's extends). The
trial runs the code as the zygote imported it when the study run started: restart the runner
after editing kdsweep, so that trials run the code DVC hashes as distill's deps.

The zygote exits when the runner that started it is gone; the trial dies with its handler
(``PR_SET_PDEATHSIG``), the handler ends it when the client goes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ENV = "KDSWEEP_WARM"  # the zygote's socket, in the environment of a trial's `dvc exp run`
READY = ".ready"  # next to the socket once the zygote's imports are done
# The entry points a trial's process runs: its `main()`, with the client's argv.
ENTRY = "kdsweep.cli"
DVC_ENTRY = "dvc.cli"
_HEADER = struct.Struct("!I")  # length of the JSON request that follows the fds
_STATUS = struct.Struct("!i")  # exit status >= 0, or -signal
_FORWARDED = (signal.SIGTERM, signal.SIGINT)
FORKED = "kdsweep: forked from the warm process"  # the first line a forked trial prints


# --------------------------------------------------------------------------- client
def delegate(entry: str = ENTRY) -> int | None:
    """Run this process's command in the zygote named by ``$KDSWEEP_WARM``; its exit status.

    ``entry``: the module whose ``main()`` runs the command there, :data:`ENTRY` (``kdsweep``,
    the default) or :data:`DVC_ENTRY`. None when no zygote is set or listening, or, for DVC, when
    it is still importing (DVC starts cold in less time): the caller then runs the command itself.
    """
    path = os.environ.get(ENV)
    if not path or (entry == DVC_ENTRY and not os.path.exists(path + READY)):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    # A forked distill must not delegate again; a forked DVC passes the socket on to its stage.
    env = {k: v for k, v in os.environ.items() if k != ENV or entry == DVC_ENTRY}
    fields = {"entry": entry, "cwd": os.getcwd(), "argv": sys.argv, "env": env, "pid": os.getpid()}
    request = json.dumps(fields).encode()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    socket.send_fds(sock, [_HEADER.pack(len(request))], [0, 1, 2])
    sock.sendall(request)
    previous = {sig: signal.signal(sig, lambda s, _: _send_signal(sock, s)) for sig in _FORWARDED}
    try:
        status = _STATUS.unpack(_recv_exactly(sock, _STATUS.size))[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if status < 0:  # the trial died of a signal: so does this process, for whoever waits on it
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


def _send_signal(sock: socket.socket, signum: int) -> None:
    with contextlib.suppress(OSError):  # the handler is gone already; the status (or a hang-up) follows
        sock.sendall(bytes([signum]))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("kdsweep warm process: connection closed before the trial's exit status")
        data += chunk
    return data


# --------------------------------------------------------------------------- zygote
# What `kdsweep distill` imports; named, not imported here, so that this module stays the client's:
# a trial runs the console entry point it names (ENTRY), the same code a cold process runs.
PRELOAD = (
    "torch",
    "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "torch.utils.tensorboard.summary",
    "optuna",
    "kdsweep.stages.distill",
    "kdsweep.trial_hook",
)
# What `dvc exp run --temp` imports as it runs (measured: all but ~0.07 s of its imports).
DVC_PRELOAD = (
    "dvc.cli.parser",
    "dvc.commands.experiments.run",
    "dvc.repo",
    "dvc.repo.index",
    "dvc.repo.reproduce",
    "dvc.repo.experiments.run",
    "dvc.repo.experiments.save",
    "dvc.repo.experiments.queue.tempdir",
    "dvc.repo.experiments.queue.celery",
    "dvc.repo.experiments.executor.local",
    "dvc.repo.datasets",
    "dvc.repo.plots",
    "dvc.utils.hydra",
    "dvc.stage",
    "dvc.output",
    "dvc.dependency",
    "dvc.dvcfile",
    "dvc_data.index",
    "dvc_data.hashfile",
    "scmrepo.git",
    "scmrepo.git.backend.dulwich",
    "scmrepo.git.backend.pygit2",
    "dulwich.client",
    "dulwich.porcelain",
    "pygit2",
    "networkx",
)


def preload() -> None:
    """Import what ``kdsweep distill`` and ``dvc exp run`` import (nothing here starts a thread or touches CUDA)."""
    for name in (*PRELOAD, ENTRY, *DVC_PRELOAD, DVC_ENTRY):
        importlib.import_module(name)


def serve(path: str, parent: int) -> None:
    """Listen on ``path``; fork a handler per connection, until process ``parent`` is gone."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)  # clients that come before the imports finish wait in the backlog
    preload()
    open(path + READY, "w").close()
    server.settimeout(1.0)
    while os.getppid() == parent:
        _reap()
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            code = 1
            try:
                code = _handle(conn)
            finally:
                os._exit(code)
        conn.close()
    server.close()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _handle(conn: socket.socket) -> int:
    """The handler of one client: fork its trial, relay signals, send back the exit status."""
    head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    head += _recv_exactly(conn, _HEADER.size - len(head))  # a stream socket may split the header
    request = json.loads(_recv_exactly(conn, _HEADER.unpack(head)[0]))
    pid = os.fork()
    if pid == 0:
        conn.close()
        _trial(request, fds)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    status = None
    while status is None:
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd in ready:
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            break
        data = conn.recv(16)
        if not data:  # the client died: the trial (and any process it started) must not run on unattended
            _signal_group(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 0
        for signum in data:
            _signal_group(pid, signum)
    with contextlib.suppress(OSError):  # the client went the moment the trial ended
        conn.sendall(_STATUS.pack(status))
    return 0


def _signal_group(pid: int, signum: int) -> None:
    """Signal the trial's process group (the trial is its leader), or the trial alone before it made the group."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _trial(request: dict, fds: list[int]) -> None:
    """In the forked trial: become the client's process (directory, environment, stdio), run, exit."""
    entry = request["entry"]
    if entry not in (ENTRY, DVC_ENTRY):
        os._exit(2)
    _die_with_parent()
    os.setpgid(0, 0)  # its own group: a relayed signal reaches the processes it starts too
    # A cold Python's handlers: Ctrl-C raises KeyboardInterrupt (kdsweep exits 130), SIGTERM kills.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    if entry == ENTRY:
        _set_threads()
        print(f"{FORKED} (pid {os.getpid()})", file=sys.stderr, flush=True)
    sys.argv = request["argv"]
    code = 0
    try:
        returned = importlib.import_module(entry).main()  # dvc.cli's returns the exit status
        code = returned if isinstance(returned, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        import atexit

        atexit._run_exitfuncs()  # what a cold process runs at exit (os._exit skips it)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """SIGKILL this process when its handler dies (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the handler died before prctl took effect
        os._exit(1)


def _set_threads() -> None:
    """OpenMP reads OMP_NUM_THREADS once, when torch is imported (in the zygote): apply the trial's own."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


# --------------------------------------------------------------------------- the runner's side
class Zygote:
    """The runner's warm process: :meth:`start` it before the trials, add :attr:`env` to each
    trial's environment, :meth:`stop` it after them. Not ``enabled``: nothing runs, ``env`` is empty."""

    def __init__(self, enabled: bool = True):
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.directory: str | None = None
        if enabled:
            self.start()

    def start(self) -> None:
        """Start the zygote; returns once its socket listens (clients queue until its imports finish)."""
        self.directory = tempfile.mkdtemp(prefix="kdsweep-warm-")  # short: a socket path holds <= 107 bytes
        path = os.path.join(self.directory, "socket")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kdsweep.warm", path, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the runner, which stops the trials
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self.env = {ENV: path}

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` as a trial runs it: a ``dvc`` command through the warm DVC client while the zygote runs."""
        if self.proc is None or cmd[:1] != ["dvc"]:
            return cmd
        return [sys.executable, "-m", "kdsweep.warmdvc", *cmd[1:]]

    def stop(self) -> None:
        """Stop the zygote (trials it forked run to their end) and remove its socket."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.proc, self.env = None, {}


def main() -> None:
    """``python -m kdsweep.warm SOCKET PARENT_PID``: the zygote (started by :func:`zygote`)."""
    path, parent = sys.argv[1], int(sys.argv[2])
    # Nothing to flush or close: an interpreter exit would spend a second or more tearing down
    # torch's modules while the runner waits in Zygote.stop.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    serve(path, parent)


if __name__ == "__main__":
    main()
