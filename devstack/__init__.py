"""The local stack for development and tests: real servers run from packages, no Docker.

`devstack.kafka.KafkaBroker` runs a single-node Kafka broker from Maven jars; everything
a server needs (jars, a detached process, ports) lives in `devstack.process`.
"""

from devstack.process import StackError, free_port

__all__ = ["StackError", "free_port"]
