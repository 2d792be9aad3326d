"""Run real ROS 2 (rclpy over DDS) in a loopback-only network namespace, so no packet leaves the machine.

From a test (the pytest process never touches DDS)::

    from ros_harness import run_in_loopback

    def scenario(count: int) -> dict:          # module level; runs in a fresh Python process
        import rclpy
        ...                                     # nodes, child processes, spinning
        return {"received": n}                  # anything json.dumps accepts

    def test_something():
        assert run_in_loopback(scenario, count=3)["received"] == 3

:func:`run_in_loopback` starts ``unshare -n`` (``unshare -rn`` when not root), brings ``lo`` up,
sets ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` and a random ``ROS_DOMAIN_ID`` (0..100), checks
that ``lo`` is the only interface, imports the function's module from its file and calls it with
the keyword arguments (JSON round-tripped), and returns its JSON result. It raises
:class:`LoopbackUnavailable` when no namespace can be made (tests fail, they never skip) and
:class:`ScenarioError`, carrying the child's traceback and output, when the function raises.

Inside a scenario: :func:`child_process` starts another process in the same namespace (a node
under test) and stops it with SIGINT on exit; :func:`spinning` spins a node on a background
thread; :func:`wait_until` polls a predicate; :func:`rss_kib` reads a process's resident memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

LOOPBACK_ENV = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
# Settings that could make DDS look beyond this namespace or bypass the checks above.
DROPPED_ENV = ("ROS_LOCALHOST_ONLY", "ROS_STATIC_PEERS", "FASTRTPS_DEFAULT_PROFILES_FILE",
               "FASTDDS_DEFAULT_PROFILES_FILE", "ROS_DISCOVERY_SERVER")
OUTPUT_TAIL = 6000


class LoopbackUnavailable(RuntimeError):
    """No loopback-only network namespace could be created here (no unshare, no permission)."""


class ScenarioError(RuntimeError):
    """The function raised in the namespace, or its process died; the message has its traceback and output."""


def loopback_env(domain_id: int | None = None) -> dict[str, str]:
    """The environment a scenario runs with: this one, minus DDS overrides, plus loopback discovery and a domain id."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(LOOPBACK_ENV)
    env["ROS_DOMAIN_ID"] = str(random.randint(0, 100) if domain_id is None else domain_id)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _namespace_command() -> list[str]:
    unshare = shutil.which("unshare")
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if unshare is None or ip is None:
        raise LoopbackUnavailable(f"need unshare and ip (util-linux, iproute2); found unshare={unshare}, ip={ip}")
    flags = ["-n"] if os.geteuid() == 0 else ["-r", "-n"]
    return [unshare, *flags, "--", "/bin/sh", "-c", '"$0" link set lo up && exec "$@"', ip]


def _tail(text: str) -> str:
    return text if len(text) <= OUTPUT_TAIL else "...\n" + text[-OUTPUT_TAIL:]


def run_in_loopback(func: Callable[..., Any], /, *, timeout_s: float = 180.0, domain_id: int | None = None,
                    **kwargs: Any) -> Any:
    """``func(**kwargs)`` in a new process inside a new loopback-only network namespace; its JSON result.

    ``func`` must be defined at module level of an importable file. Every process it starts belongs to
    the namespace and is killed with it after ``timeout_s``.
    """
    source = Path(sys.modules[func.__module__].__file__ or "").resolve()
    with tempfile.TemporaryDirectory(prefix="ros_harness_") as tmp:
        args_file, result_file = Path(tmp) / "kwargs.json", Path(tmp) / "result.json"
        args_file.write_text(json.dumps(kwargs))
        cmd = [*_namespace_command(), sys.executable, str(Path(__file__).resolve()), str(source), func.__qualname__,
               str(args_file), str(result_file)]
        proc = subprocess.Popen(cmd, env=loopback_env(domain_id), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise ScenarioError(f"{func.__qualname__} ran past {timeout_s:.0f} s; output:\n{_tail(output)}") from None
        finally:
            _kill_group(proc.pid)
        if not result_file.exists():
            if "unshare" in output and proc.returncode != 0 and "Traceback" not in output:
                raise LoopbackUnavailable(f"cannot create a network namespace: {_tail(output.strip())}")
            raise ScenarioError(f"{func.__qualname__} exited with {proc.returncode} and no result; "
                                f"output:\n{_tail(output)}")
        result = json.loads(result_file.read_text())
    if "error" in result:
        raise ScenarioError(f"{func.__qualname__} raised in the namespace:\n{result['error']}\n"
                            f"output:\n{_tail(output)}")
    return result["value"]


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace (from ``/proc/self/net/dev``)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)


# ---- helpers for use inside a scenario --------------------------------------------------------------


class Child:
    """A process started by :func:`child_process`; its output goes to a log file."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen, self.log_path = popen, log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return _tail(self.log_path.read_text(errors="replace")) if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 15.0) -> int:
        """Send ``sig`` (if still running), wait up to ``timeout_s``, then kill; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                return self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                return -9
        return self.popen.returncode


@contextmanager
def child_process(argv: Sequence[str], *, name: str = "child", env: dict[str, str] | None = None) -> Iterator[Child]:
    """Start ``argv`` in this namespace; on exit it is stopped with SIGINT (then killed after 15 s).
    An exception in the body gets the child's log appended."""
    log = Path(tempfile.mkdtemp(prefix=f"{name}_")) / "log.txt"
    with log.open("wb") as out:
        popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env)
    child = Child(popen, log)
    try:
        yield child
    except BaseException as exc:
        child.stop()
        raise ScenarioError(f"{type(exc).__name__}: {exc}\n--- {name} log ---\n{child.log()}") from exc
    finally:
        child.stop()


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@contextmanager
def spinning(*nodes: Any) -> Iterator[Any]:
    """Spin ``nodes`` on a background thread with their own executor for the duration of the block."""
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor()
    for node in nodes:
        executor.add_node(node)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.05)

    thread = threading.Thread(target=spin, name="ros_harness-spin", daemon=True)
    thread.start()
    try:
        yield executor
    finally:
        stop.set()
        thread.join()
        executor.shutdown()


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it is truthy (True) or ``timeout_s`` passes (False)."""
    end = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval_s)


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def _run(source: str, qualname: str, args_file: str, result_file: str) -> int:
    found = interfaces()
    if found != ["lo"]:
        raise LoopbackUnavailable(f"expected only 'lo' in this network namespace, found {found}")
    sys.path[:0] = [str(Path(source).parent), str(Path(__file__).parent)]
    spec = importlib.util.spec_from_file_location(Path(source).stem, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    func: Any = module
    for part in qualname.split("."):
        func = getattr(func, part)
    try:
        value = func(**json.loads(Path(args_file).read_text()))
        payload = json.dumps({"value": value})
    except BaseException:
        payload = json.dumps({"error": traceback.format_exc()})
    Path(result_file).write_text(payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(_run(*sys.argv[1:5]))
