"""A local Apache Spark standalone cluster for development and tests: `lakegate spark start|stop|status`.

A master, N workers and a Spark Connect server, all bound to 127.0.0.1, run from the Spark that the
`pyspark` package bundles (Java 17 from the system). The Connect server takes a pre-shared token,
drawn at start and kept in `<dir>/token` (mode 0600); lakegate's Spark engine reads it through
`query.spark.token_file`. Each process's pid is recorded in `<dir>/cluster.json`, and `stop` stops
only those processes, and only while each still runs the Spark class it was started as.

A production cluster is the organisation's own: point `query.spark.remote` at its Spark Connect
endpoint instead (README, "Scaling out").
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lakegate.errors import BackendError, ConfigurationError

__all__ = ["ClusterInfo", "LocalSparkCluster", "free_port", "spark_home"]

MASTER = "org.apache.spark.deploy.master.Master"
WORKER = "org.apache.spark.deploy.worker.Worker"
CONNECT = "org.apache.spark.sql.connect.service.SparkConnectServer"
STATE_FILE = "cluster.json"
TOKEN_FILE = "token"
#: The settings of the Spark Connect server's own Spark application.
CONNECT_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.runSQLOnFiles": "false",
    "spark.sql.ansi.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.fieldId.read.enabled": "true",
    "spark.sql.parquet.fieldId.read.ignoreMissing": "true",
    # A task that an interrupt (lakegate's time limit, a client's cancellation) cannot stop, as a
    # join looping in generated code, gets its executor killed and replaced after 10 s, so that a
    # stopped query does not keep the workers busy.
    "spark.task.reaper.enabled": "true",
    "spark.task.reaper.killTimeout": "10s",
}


@dataclass(frozen=True)
class ClusterInfo:
    """A started cluster: its Spark Connect endpoint and the processes lakegate started."""

    remote: str  # sc://localhost:PORT
    token_file: str
    master_url: str
    workers: int
    pids: dict[str, int]  # role ("master", "worker-1", "connect") -> pid


def spark_home() -> Path:
    """The Spark installation inside the `pyspark` package.

    Raises:
        ConfigurationError: pyspark is not installed, or Java is not on PATH.
    """
    import importlib.util

    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        raise ConfigurationError("a local Spark cluster needs pyspark: pip install 'lakegate[spark]'")
    if shutil.which("java") is None:
        raise ConfigurationError(
            "a local Spark cluster needs Java 17 or newer on PATH (Debian: openjdk-17-jre-headless)"
        )
    return Path(spec.origin).parent


#: What the Spark processes take of lakegate's environment: what Java and Spark's scripts need, and
#: Spark's and Java's own settings. Never the rest (lakegate's secrets, a catalog's credentials): a
#: query on the cluster should find nothing there even where a wall fails.
INHERITED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "TZ", "JAVA_HOME"})
INHERITED_PREFIXES = ("SPARK_", "JAVA_", "_JAVA_", "JDK_")
#: A client's Connect URL may carry a token; the server's own token is set for the Connect server alone.
NOT_INHERITED = frozenset({"SPARK_CONNECT_AUTHENTICATE_TOKEN", "SPARK_REMOTE"})


def _inherited_environment() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if (name in INHERITED or name.startswith(INHERITED_PREFIXES)) and name not in NOT_INHERITED
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _runs(pid: int, spark_class: str) -> bool:
    """Whether process `pid` is alive and runs `spark_class` (not a later process with a reused pid)."""
    try:
        return spark_class.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


_CLASSES = {"master": MASTER, "connect": CONNECT}


def _class_of(role: str) -> str:
    return _CLASSES.get(role, WORKER)


class LocalSparkCluster:
    """The local cluster whose state lives in `directory` (by default `<home>/spark`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def info(self) -> ClusterInfo | None:
        """The recorded cluster, or None when none was started here."""
        try:
            data = json.loads((self.directory / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return ClusterInfo(**data)

    def status(self) -> dict[str, bool]:
        """Each recorded process, and whether it still runs."""
        info = self.info()
        if info is None:
            return {}
        return {role: _runs(pid, _class_of(role)) for role, pid in info.pids.items()}

    def start(
        self,
        *,
        workers: int = 1,
        worker_cores: int = 1,
        worker_memory: str = "1g",
        port: int = 15002,
        timeout_s: float = 180.0,
    ) -> ClusterInfo:
        """Start a master, `workers` workers and a Spark Connect server on `port`; wait until the
        server listens and every worker has registered.

        Raises:
            ConfigurationError: pyspark or Java is missing, a cluster recorded here still runs, or
                `port` is taken.
            BackendError: the cluster did not come up within `timeout_s` (what started is stopped;
                the logs under `<dir>/logs` say why).
        """
        home = spark_home()
        if any(self.status().values()):
            raise ConfigurationError(f"a Spark cluster started from {self.directory} still runs: stop it first")
        if _listening(port):
            raise ConfigurationError(f"port {port} is taken: choose another with --port")
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        token_file = self.directory / TOKEN_FILE
        token_file.touch(mode=0o600)
        token_file.chmod(0o600)
        token_file.write_text(token)
        env = {
            **_inherited_environment(),
            "SPARK_HOME": str(home),
            "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_LOG_DIR": str(logs),
            "SPARK_WORKER_DIR": str(self.directory / "work"),
            "SPARK_NO_DAEMONIZE": "1",
        }
        master_port = free_port()
        master_url = f"spark://127.0.0.1:{master_port}"
        spark_class = str(home / "bin" / "spark-class")
        commands = {
            "master": [spark_class, MASTER, "--host", "127.0.0.1", "--port", str(master_port), "--webui-port", "0"],
            **{
                f"worker-{n}": [
                    spark_class, WORKER, "--host", "127.0.0.1", "--cores", str(worker_cores), "--memory",
                    worker_memory, "--webui-port", "0", master_url,
                ]
                for n in range(1, workers + 1)
            },
        }  # fmt: skip
        conf = {
            **CONNECT_CONF,
            "spark.connect.grpc.binding.address": "127.0.0.1",
            "spark.connect.grpc.binding.port": str(port),
            "spark.executor.memory": worker_memory,
            "spark.executor.cores": str(worker_cores),
            "spark.driver.memory": "1g",
        }
        commands["connect"] = [
            str(home / "bin" / "spark-submit"), "--class", CONNECT, "--name", "lakegate Spark Connect",
            "--master", master_url, *(arg for key, value in conf.items() for arg in ("--conf", f"{key}={value}")),
        ]  # fmt: skip
        pids: dict[str, int] = {}
        try:
            for role, command in commands.items():
                role_env = {**env, "SPARK_CONNECT_AUTHENTICATE_TOKEN": token} if role == "connect" else env
                with (logs / f"{role}.log").open("ab") as log_file:
                    process = subprocess.Popen(
                        command,
                        env=role_env,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: stop ends its children too
                    )
                pids[role] = process.pid
                if role == "master":
                    self._wait(lambda: _listening(master_port), timeout_s, "the Spark master")
            info = ClusterInfo(f"sc://localhost:{port}", str(token_file), master_url, workers, pids)
            (self.directory / STATE_FILE).write_text(json.dumps(asdict(info), indent=2))
            self._wait(lambda: _listening(port), timeout_s, "the Spark Connect server")
            self._wait(lambda: self._registered(logs) >= workers, timeout_s, "the Spark workers")
        except BaseException:
            _stop(pids)
            raise
        return info

    @staticmethod
    def _registered(logs: Path) -> int:
        try:
            return (logs / "master.log").read_text(errors="replace").count("Registering worker")
        except OSError:
            return 0

    def _wait(self, ready: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():  # type: ignore[operator]  # a callable
            if time.monotonic() > deadline:
                raise BackendError(f"{what} did not start within {timeout_s:g} s (logs: {self.directory / 'logs'})")
            time.sleep(0.5)

    def stop(self) -> list[str]:
        """Stop the processes recorded here that still run what they were started as; the roles stopped."""
        info = self.info()
        if info is None:
            return []
        stopped = _stop({role: pid for role, pid in info.pids.items() if _runs(pid, _class_of(role))})
        with contextlib.suppress(OSError):
            (self.directory / STATE_FILE).unlink()
        return stopped


def _stop(pids: dict[str, int]) -> list[str]:
    """SIGTERM each process group (Connect server first, master last), then SIGKILL what remains."""
    order = sorted(pids, key=lambda role: {"connect": 0, "master": 2}.get(role, 1))
    for role in order:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pids[role], signal.SIGTERM)
    deadline = time.monotonic() + 20
    for role in order:
        while time.monotonic() < deadline and _alive(pids[role]):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pids[role], signal.SIGKILL)
    return order


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
