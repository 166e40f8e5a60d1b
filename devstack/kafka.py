"""A one-broker Apache Kafka cluster for development and tests, run from Maven jars, no Docker.

`KafkaBroker(state_dir).start()` takes the broker's jars from Maven Central (once; see
devstack/maven/kafka.xml), writes `server.properties`, formats the log directory the first
time, starts `java ... kafka.Kafka server.properties` detached and returns when an admin
client can list topics. Data lives in `state_dir/data` and survives `stop()` and `start()`.

Two shapes of the KRaft quorum (one voter either way):

- combined (the default): one JVM is both broker and controller. Cheapest; but a crash
  takes the controller down with the broker, and the restarted node fences its own
  previous registration about 4 s after it starts, which leaves every partition without a
  leader for a moment while its coordinators are already at work.
- `dedicated_controller=True`: the controller runs as a JVM of its own (node 1, in
  `state_dir/controller/`, same layout as below) and the broker (node 2) as another, as
  production clusters run them. `kill()` kills only the broker; the controller stays up,
  fences the dead broker and hands leadership back when the restarted broker has caught
  up.

Layout of `state_dir`:

    server.properties   written on every start (ports may change between runs)
    log4j2.properties   broker logging: INFO to logs/server.log, rolled at 10 MB
    data/               the log directory (topics, offsets; the cluster metadata)
    logs/server.log     the broker's own log
    kafka.out           the JVM's stdout and stderr (start-up failures land here)
    kafka.pid           the running broker's pid
    controller/         with a dedicated controller: its own files, named as above

Raises `devstack.StackError` when the jars cannot be had, a port is taken, or the broker
exits or is not ready in time (with the tail of its logs).
"""

from __future__ import annotations

import base64
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

# The admin package re-exports NewTopic without declaring it; its home is the C extension.
from confluent_kafka.cimpl import NewTopic

from devstack.process import (
    DetachedProcess,
    StackError,
    ensure_port_free,
    free_port,
    port_accepts,
    require_tool,
    resolve_jars,
)

__all__ = ["KafkaBroker", "free_port"]

POM = Path(__file__).resolve().parent / "maven" / "kafka.xml"
DEFAULT_LIB_DIR = Path.home() / ".cache" / "category-suggester" / "kafka-lib"

_POLL_S = 0.2

_LOG4J2 = """\
# Written by devstack/kafka.py on every start.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {logs}/server.log
appender.file.filePattern = {logs}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
# Per-partition state changes and per-request lines: noise on a development machine.
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""


class _Node:
    """One Kafka JVM of the cluster: its directory, configuration and process."""

    def __init__(self, name: str, state_dir: Path, heap: str) -> None:
        self.name = name
        self.state_dir = state_dir
        self.heap = heap
        self.data_dir = state_dir / "data"
        self.config_file = state_dir / "server.properties"
        self.log4j_file = state_dir / "log4j2.properties"
        self.process = DetachedProcess(
            name, pid_file=state_dir / "kafka.pid", log_file=state_dir / "kafka.out"
        )

    def write_config(self, properties: Mapping[str, str]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{key}={value}" for key, value in properties.items()]
        self.config_file.write_text(
            "# Written by devstack/kafka.py on every start.\n" + "\n".join(lines) + "\n"
        )
        self.log4j_file.write_text(_LOG4J2.format(logs=self.state_dir / "logs"))

    def cluster_id(self) -> str | None:
        try:
            text = (self.data_dir / "meta.properties").read_text()
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

    def format(self, java: str, classpath: str, cluster_id: str) -> None:
        """Format the log directory for the cluster `cluster_id` (kafka-storage.sh format)."""
        command = [
            java,
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.config_file),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackError(
                f"formatting {self.data_dir} failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )

    def launch(self, java: str, classpath: str) -> None:
        self.process.start(
            [
                java,
                f"-Xmx{self.heap}",
                # Kafka's own JVM defaults (kafka-run-class.sh), minus the GC log.
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:InitiatingHeapOccupancyPercent=35",
                "-XX:+ExplicitGCInvokesConcurrent",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.log4j_file}",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(self.config_file),
            ],
            cwd=self.state_dir,
        )

    def log_tails(self) -> str:
        server_log = self.state_dir / "logs" / "server.log"
        tail = ""
        if server_log.is_file():
            tail = "\n".join(server_log.read_text(errors="replace").splitlines()[-30:])
        return (
            f"--- {self.name}: kafka.out ---\n{self.process.log_tail()}\n"
            f"--- {self.name}: server.log ---\n{tail}"
        )


class KafkaBroker:
    """A one-broker KRaft cluster listening on localhost: one node, or broker and controller.

    The client listener is PLAINTEXT on `localhost:<port>`, the controller listener on
    `localhost:<controller_port>`. `extra_properties` are applied last to the broker's
    configuration (the combined node's, or the dedicated broker's) and override any
    default, which is how a caller adds listeners, for example a SASL_SSL one:

        KafkaBroker(state_dir, port=p, controller_port=c, extra_properties={
            "listeners": f"PLAINTEXT://localhost:{p},CONTROLLER://localhost:{c},"
                         f"SASL_SSL://localhost:{s}",
            "advertised.listeners": f"PLAINTEXT://localhost:{p},SASL_SSL://localhost:{s}",
            "listener.security.protocol.map":
                "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": "...",
            "ssl.keystore.location": "...", ...
        })

    (With a dedicated controller the broker has no CONTROLLER listener of its own: leave
    it out of `listeners`.)

    The instance that started the cluster and any later instance on the same `state_dir`
    and shape (another process: `make stack-down`) can stop it; the pid files link them.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int = 9092,
        controller_port: int = 9093,
        heap: str = "512m",
        dedicated_controller: bool = False,
        controller_heap: str = "256m",
        extra_properties: Mapping[str, str] | None = None,
        lib_dir: Path = DEFAULT_LIB_DIR,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        self.dedicated_controller = dedicated_controller
        self.extra_properties = dict(extra_properties or {})
        self.lib_dir = lib_dir
        self._broker = _Node("Kafka broker", self.state_dir, heap)
        self._controller = (
            _Node("Kafka controller", self.state_dir / "controller", controller_heap)
            if dedicated_controller
            else None
        )
        # Where the controller's log stood when the broker was last killed.
        self._fence_mark = 0
        self.data_dir = self._broker.data_dir
        self.config_file = self._broker.config_file
        self.log4j_file = self._broker.log4j_file

    @property
    def bootstrap_servers(self) -> str:
        return f"localhost:{self.port}"

    @property
    def controller_state_dir(self) -> Path:
        """Where the controller's files are: its own folder, or the combined node's."""
        return self.state_dir if self._controller is None else self._controller.state_dir

    def _cluster_properties(self) -> dict[str, str]:
        """What every node of the cluster is configured with, whatever its role.

        In KRaft the controller creates topics and applies the topic defaults, and the broker
        creates the internal topics: both get these.
        """
        return {
            # The one voter, named statically: the controller port may differ between runs
            # of the same state_dir (a dynamic quorum would keep the first run's address).
            "controller.quorum.voters": f"1@localhost:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            # Topics are created on purpose (create_topics, the stack's set-up), never by a
            # typo in a producer's topic name.
            "auto.create.topics.enable": "false",
            "num.partitions": "3",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # One broker: every internal topic has one replica, and transactions work with it.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # The controller fences a broker whose heartbeats stopped after this; a crashed
            # broker may register again only then: 4 s instead of 9 s keeps fault tests quick.
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
            # Tests join groups constantly; the default 3 s wait for more members only slows them.
            "group.initial.rebalance.delay.ms": "0",
        }

    def properties(self) -> dict[str, str]:
        """The broker's configuration: the cluster's defaults, then `extra_properties`."""
        props = self._cluster_properties()
        if self._controller is None:
            props.update(
                {
                    "process.roles": "broker,controller",
                    "node.id": "1",
                    "listeners": (
                        f"PLAINTEXT://localhost:{self.port},"
                        f"CONTROLLER://localhost:{self.controller_port}"
                    ),
                }
            )
        else:
            props.update(
                {
                    "process.roles": "broker",
                    "node.id": "2",
                    "listeners": f"PLAINTEXT://localhost:{self.port}",
                }
            )
        props.update(
            {
                "advertised.listeners": f"PLAINTEXT://localhost:{self.port}",
                "inter.broker.listener.name": "PLAINTEXT",
                "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "log.dirs": str(self._broker.data_dir),
            }
        )
        props.update(self.extra_properties)
        return props

    def controller_properties(self) -> dict[str, str]:
        """The dedicated controller's configuration (raises `StackError` in the combined shape)."""
        if self._controller is None:
            raise StackError("this cluster runs its controller inside the broker")
        props = self._cluster_properties()
        props.update(
            {
                "process.roles": "controller",
                "node.id": "1",
                "listeners": f"CONTROLLER://localhost:{self.controller_port}",
                "listener.security.protocol.map": "CONTROLLER:PLAINTEXT",
                "log.dirs": str(self._controller.data_dir),
            }
        )
        return props

    def start(self, timeout_s: float = 120) -> None:
        """Start what is not running (controller, broker) and wait until the broker is ready."""
        deadline = time.monotonic() + timeout_s
        launch = [node for node in self._nodes() if not node.process.is_running()]
        if launch:
            java = require_tool("java")
            for node in launch:
                for port, what in self._ports(node):
                    ensure_port_free(port, what)
            resolve_jars(POM, self.lib_dir)
            self._write_config()
            classpath = f"{self.lib_dir}/*"
            cluster_id = self._controller_node().cluster_id() or self._broker.cluster_id()
            cluster_id = cluster_id or _new_cluster_id()
            for node in self._nodes():
                if node.cluster_id() is None:
                    node.format(java, classpath, cluster_id)
            for node in launch:
                node.launch(java, classpath)
        self._wait_ready(deadline)

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the broker, then the controller, cleanly (SIGTERM), SIGKILL after `timeout_s`.

        The broker goes first: its controlled shutdown needs the controller. No-op for what
        is not running.
        """
        self._broker.process.stop(timeout_s)
        if self._controller is not None:
            self._controller.process.stop(timeout_s)

    def kill(self) -> None:
        """SIGKILL the broker now, as a crash would; the data stays for the next start.

        A dedicated controller is left running, as a broker host's crash leaves it.
        """
        self._fence_mark = self._controller_log_size()
        self._broker.process.kill()

    def wait_fenced(self, timeout_s: float = 30) -> None:
        """Return once the dedicated controller has fenced the broker killed by `kill()`.

        The controller fences a broker whose heartbeats stopped `broker.session.timeout.ms`
        (4 s) ago and only then takes leadership away from it. A broker restarted before
        that replays the old metadata, in which it still leads every partition, and starts
        its coordinators; their first work then meets the fence, and every partition has no
        leader for a moment (GUARANTEES.md, "Broker crashes"). Raises `StackError` in the
        combined shape, where no controller outlives the broker, and after `timeout_s`.
        """
        if self._controller is None:
            raise StackError("the controller runs inside the broker: nothing fences it")
        node_id = self.properties()["node.id"]
        fenced = f"Fencing broker {node_id} at epoch "
        deadline = time.monotonic() + timeout_s
        while True:
            log = self._controller.state_dir / "logs" / "server.log"
            try:
                with log.open("rb") as handle:
                    size = handle.seek(0, 2)
                    # A rolled log starts again from 0: read it whole.
                    handle.seek(self._fence_mark if size >= self._fence_mark else 0)
                    if fenced.encode() in handle.read():
                        return
            except FileNotFoundError:
                pass
            if time.monotonic() >= deadline:
                raise StackError(
                    f"the controller did not fence broker {node_id} within {timeout_s:.0f}s:\n"
                    f"{self._log_tails()}"
                )
            time.sleep(_POLL_S)

    def _controller_log_size(self) -> int:
        if self._controller is None:
            return 0
        try:
            return (self._controller.state_dir / "logs" / "server.log").stat().st_size
        except FileNotFoundError:
            return 0

    def controller_pid(self) -> int | None:
        """The running controller's pid: the broker's own in the combined shape."""
        return self._controller_node().process.pid()

    def is_running(self) -> bool:
        """Whether every process of the cluster runs."""
        return all(node.process.is_running() for node in self._nodes())

    def create_topics(
        self,
        topics: Mapping[str, int],
        *,
        replication: int = 1,
        config: Mapping[str, str] | None = None,
        timeout_s: float = 30,
    ) -> None:
        """Create each topic (name -> partitions) that does not exist yet, and wait for it.

        Returns when every partition of every topic has a leader. An existing topic is left
        as it is; one with a different partition count raises `StackError`, since silently
        keeping it would hide a changed set-up.
        """
        admin = self._admin()
        new = [
            NewTopic(
                name, num_partitions=n, replication_factor=replication, config=dict(config or {})
            )
            for name, n in topics.items()
        ]
        for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
            # exception() rather than result(): a raised error's traceback would tie this
            # frame, and so the admin client, into a cycle that outlives the call.
            error = future.exception()
            if error is None or _is_error(error, KafkaError.TOPIC_ALREADY_EXISTS):
                continue
            raise StackError(f"creating topic {name!r} failed: {error}") from error
        deadline = time.monotonic() + timeout_s
        while True:
            pending = self._topics_without_leaders(admin, topics)
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise StackError(f"topics not ready after {timeout_s:.0f}s: {pending}")
            time.sleep(_POLL_S)

    def _nodes(self) -> list[_Node]:
        """The cluster's processes in start order: the controller first."""
        return [self._broker] if self._controller is None else [self._controller, self._broker]

    def _controller_node(self) -> _Node:
        return self._broker if self._controller is None else self._controller

    def _ports(self, node: _Node) -> list[tuple[int, str]]:
        """The ports `node` listens on, with what to call them in an error."""
        controller = (self.controller_port, "Kafka controller")
        if node is self._controller:
            return [controller]
        return [(self.port, "Kafka")] + ([controller] if self._controller is None else [])

    def _write_config(self) -> None:
        self._broker.write_config(self.properties())
        if self._controller is not None:
            self._controller.write_config(self.controller_properties())

    def _wait_ready(self, deadline: float) -> None:
        """Return when this broker answers a metadata request; raise if it dies or is late.

        The cluster id in the answer must be the one in our log directory, so that another
        server on the same port is never taken for ours.
        """
        expected = self._broker.cluster_id()
        admin: AdminClient | None = None
        while True:
            for node in self._nodes():
                if not node.process.is_running():
                    code = node.process.exit_code()
                    raise StackError(
                        f"{node.name} exited (status {code}) before the broker was ready; "
                        f"see {node.process.log_file} and {node.state_dir / 'logs'}:\n"
                        f"{self._log_tails()}"
                    )
            # Connecting only once the port accepts keeps librdkafka from logging refusals.
            if port_accepts(self.port):
                admin = admin or self._admin()
                try:
                    metadata = admin.list_topics(timeout=2)
                except KafkaException:
                    metadata = None
                if metadata is not None:
                    if metadata.cluster_id != expected:
                        raise StackError(
                            f"{self.bootstrap_servers} answers for cluster "
                            f"{metadata.cluster_id}, not this broker's {expected}"
                        )
                    return
            if time.monotonic() >= deadline:
                raise StackError(
                    f"Kafka broker not ready on {self.bootstrap_servers} in time:\n"
                    f"{self._log_tails()}"
                )
            time.sleep(_POLL_S)

    def _log_tails(self) -> str:
        return "\n".join(node.log_tails() for node in self._nodes())

    def _admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap_servers})

    @staticmethod
    def _topics_without_leaders(admin: AdminClient, topics: Mapping[str, int]) -> list[str]:
        metadata = admin.list_topics(timeout=5)
        pending = []
        for name, partitions in topics.items():
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                pending.append(name)
            elif len(topic.partitions) != partitions:
                raise StackError(
                    f"topic {name!r} exists with {len(topic.partitions)} partitions, "
                    f"not {partitions}"
                )
            elif any(p.leader < 0 for p in topic.partitions.values()):
                pending.append(name)
        return pending


def _is_error(error: BaseException, code: int) -> bool:
    return (
        isinstance(error, KafkaException)
        and isinstance(error.args[0], KafkaError)
        and error.args[0].code() == code
    )


def _new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.

    Kafka never hands out an id that starts with '-' (it would read as a command-line
    option), so neither do we.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id
