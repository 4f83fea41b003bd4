"""The recipe's command (`python -m recipes.flowgrpo.main ...`) for the tests, forked from a process that has
already imported what the recipe's driver imports.

Why: a run's driver spends its first ~12 s on one core importing verl, torch, tensordict and transformers before it
places a single actor, and a joined test run (``recipe_ray``) has nothing else to do meanwhile; the suite makes
about 30 such runs and as many config-error runs. Here one server process per test session pays those imports once
and forks a child per run. The child is a separate process running the recipe's module from its first line, as
``-m`` does (``runpy``, ``__main__``), with the run's own argv, environment, working directory, stdio, session,
signals and exit code (a signal kills it; its exit status comes back as ``subprocess`` reports one). What differs
from a fresh interpreter: the modules are already in ``sys.modules`` (their import-time side effects on
``os.environ`` are kept, as the run's own imports would make them), so a run whose environment differs from the
server's in a variable read at import time would not see it: such a run (any variable outside
``RUN_TIME_VARIABLES``) starts as a plain subprocess instead. ``VERL_OMNI_TEST_COLD_RECIPE=1`` makes every run one.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE_MODULE = "recipes.flowgrpo.main"
# Variables the recipe and Ray read when a run starts, not when a module is imported: a run may set them. Among
# them what a ``ray.init`` or an in-process trainer in the test process adds to its environment, which the runs
# started after it inherit. Not RAY_AUTH_MODE: Ray's core library reads it when loaded (tests/conftest.py fixes it).
RUN_TIME_VARIABLES = frozenset(
    {
        "RAY_ADDRESS",
        "RAY_USAGE_STATS_ENABLED",
        "VERL_OMNI_CACHE",
        "MODEL_PATH",
        "PICKSCORE_PATH",
        "PYTHONUNBUFFERED",
        "PYTHONBREAKPOINT",
        "RAY_CLIENT_MODE",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV",
        "PYTEST_CURRENT_TEST",  # pytest's, set anew for every test
        "TENSORBOARD_DIR",
        "VERL_FILE_LOGGER_PATH",
        # tensordict reads it at import, but only its set_lazy_legacy context writes it (leaving "False", the
        # default, behind in the test process); the runs never set it
        "LAZY_LEGACY_OP",
        "TORCHINDUCTOR_CACHE_DIR",  # a cache directory torch sets in the test process; read when compiling
    }
)
_MAX_MESSAGE = 1 << 20


def _preload() -> None:
    """What the recipe's driver imports: its module, the modules it loads beside Ray's start, and matplotlib, which
    it loads to draw the reward curve at the end (about 1 s)."""
    import importlib

    main = importlib.import_module(RECIPE_MODULE)
    for name in (*main._DRIVER_MODULES, "matplotlib.figure", "matplotlib.backends.backend_agg"):
        importlib.import_module(name)


def _serve(path: str) -> dict[str, Any] | None:
    """Answer fork requests on a Unix socket until the test process that started this one is gone. Returns only in
    a forked child, with its request; the server itself exits from here."""
    parent = os.getppid()
    before = dict(os.environ)
    _preload()
    added = {k: v for k, v in os.environ.items() if k not in before}  # import-time defaults (verl sets one)
    # Out of the cyclic GC's reach: a child's collections would otherwise walk (and so copy, page by page) the whole
    # preloaded heap it shares with this process: 1.7 s instead of 0.8 s for a config-error run, measured.
    gc.collect()
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(16)
    # what a child starts from; a variable an import set (LAZY_LEGACY_OP: tensordict) that the test process's own
    # imports set too then matches
    print(json.dumps({"ready": True, "env": dict(os.environ)}), flush=True)
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        readable, _, _ = select.select([server], [], [], 0.05)
        if readable:
            conn, _ = server.accept()
            message, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 3)
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                server.close()
                for other in children.values():
                    other.close()
                conn.close()
                _become_the_run(request, fds, added)
                return request
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):  # the asking test is gone; the run still gets reaped
                conn.send(json.dumps({"pid": pid}).encode())
            children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):  # the test that started it is gone: nobody to tell
                    conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
                conn.close()
    return None


def _become_the_run(request: dict[str, Any], fds: list[int], added: dict[str, str]) -> None:
    """In the forked child: the run's stdio, session, directory, environment and argv, as its own process would."""
    stdin, stdout, stderr = fds
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**added, **request["env"]})
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(write_through=unbuffered)
    sys.stderr.reconfigure(write_through=unbuffered)
    sys.path[:2] = [os.getcwd()]  # what `python -m` puts first (the server had the repository and tests/)
    sys.argv = [sys.argv[0], *request["args"]]  # runpy sets argv[0] to the module's file


class WarmRecipe:
    """``subprocess``-like handle of one run a server forked: ``pid``, ``poll``, ``wait``, ``send_signal``,
    ``kill``, ``communicate`` and ``stdout`` (a text pipe when asked for) behave as ``subprocess.Popen``'s."""

    def __init__(self, args: list[str], conn: socket.socket, pid: int, stdout: Any) -> None:
        self.args, self.pid, self.stdout, self.returncode = args, pid, stdout, None
        self._conn = conn

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self.returncode = int(json.loads(self._conn.recv(_MAX_MESSAGE))["returncode"])
            self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            select.select([self._conn], [], [], 0.5 if left is None else min(left, 0.5))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str | None, None]:
        """The rest of stdout (when it is a pipe) and the exit, as ``Popen.communicate``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = None
        if self.stdout is not None:
            rest: list[str] = []
            reader = threading.Thread(target=lambda: rest.append(self.stdout.read()), daemon=True)
            reader.start()
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
            out = rest[0]
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        return out, None


class _Server:
    """One fork server per test process, started on first use and stopped at exit."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="vo-warm-", dir="/tmp")  # short: a socket path must fit 107 bytes
        os.chmod(self._dir, 0o700)
        self.path = os.path.join(self._dir, "fork.sock")
        code = f"import sys; sys.path[0] = {str(REPO)!r}; sys.path.insert(1, {str(REPO / 'tests')!r}); "
        code += "import warm_recipe; warm_recipe._serve_main(sys.argv[1])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, self.path],
            cwd=REPO,
            env=dict(os.environ),  # not the C environment, where a library of this process may have set more
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the recipe fork server exited with {self.proc.wait()} before it was ready")
        self.env = json.loads(line)["env"]
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)

    def import_time_differences(self, env: dict[str, str]) -> set[str]:
        """The variables a run with ``env`` would see differently in a forked child than in a fresh interpreter."""
        return {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)} - RUN_TIME_VARIABLES


_server: _Server | None = None


def _the_server() -> _Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
    return _server


def start(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | str = REPO,
    stdout: int | None = None,
    stderr: int | None = None,
    start_new_session: bool = False,
    cold: bool = False,
) -> Any:
    """``subprocess.Popen([sys.executable, "-m", "recipes.flowgrpo.main", *args], ...)``, forked warm where the
    environment allows (see the module's docstring). ``stdout``/``stderr``: None (inherit), ``subprocess.DEVNULL``,
    ``subprocess.PIPE`` (stdout only), ``subprocess.STDOUT`` (stderr only) or a file descriptor."""
    env = dict(os.environ if env is None else env)
    cmd = [sys.executable, "-m", RECIPE_MODULE, *args]
    kwargs = {"stdout": stdout, "stderr": stderr, "start_new_session": start_new_session}
    if cold or os.environ.get("VERL_OMNI_TEST_COLD_RECIPE") == "1":
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **kwargs)
    server = _the_server()
    differ = server.import_time_differences(env)
    if differ:  # said, so that a suite silently gone cold shows in pytest's warnings summary
        warnings.warn(f"recipe run started cold: {sorted(differ)} differ from the warm driver's", stacklevel=2)
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **kwargs)
    opened: list[int] = []
    pipe = None
    if stdout == subprocess.PIPE:
        read_end, write_end = os.pipe()
        pipe, stdout = os.fdopen(read_end, "r", errors="replace"), write_end
        opened.append(write_end)
    null = os.open(os.devnull, os.O_RDWR)
    opened.append(null)
    out_fd = {None: 1, subprocess.DEVNULL: null}.get(stdout, stdout)
    err_fd = {None: 2, subprocess.DEVNULL: null, subprocess.STDOUT: out_fd}.get(stderr, stderr)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(server.path)
        request = {"args": list(args), "env": env, "cwd": str(cwd), "new_session": start_new_session}
        socket.send_fds(conn, [json.dumps(request).encode()], [null, out_fd, err_fd])
        pid = int(json.loads(conn.recv(_MAX_MESSAGE))["pid"])
    finally:
        for fd in opened:
            os.close(fd)
    return WarmRecipe(cmd, conn, pid, pipe)


def run(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | str = REPO,
    timeout: float | None = None,
    cold: bool = False,
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", "recipes.flowgrpo.main", *args], capture_output=True, text=True,
    ...)``: on a timeout the run is killed and ``subprocess.TimeoutExpired`` raised, as ``subprocess.run`` does."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = start(args, env=env, cwd=cwd, stdout=out.fileno(), stderr=err.fileno(), cold=cold)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return subprocess.CompletedProcess(proc.args, proc.returncode, *texts)


def _serve_main(path: str) -> None:
    """The server's entry point; in a forked child, the run: the recipe's module as ``__main__``, as ``-m`` runs it."""
    request = _serve(path)
    if request is None:
        return
    import runpy

    sys.modules.pop(RECIPE_MODULE)  # loaded by the preload; `-m` runs it as __main__ only, so does this
    runpy.run_module(RECIPE_MODULE, run_name="__main__", alter_sys=True)
