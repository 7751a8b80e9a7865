"""Sources: the transports that bring source messages to the worker.

Each source connects, consumes and reconnects on its own, and hands every message to
the dispatcher as a :class:`Delivery` with an acknowledgement handle; the dispatcher
does the same for all of them (translation, publishing, dead letters, historian rows,
availability, metrics), and the source acknowledges a message only when the handle says
all its effects are safe. The MQTT, AMQP and Modbus sources are here.
"""

from __future__ import annotations

from .amqp import AmqpSource
from .base import Delivery, Gate, Source
from .memory import MemorySource
from .modbus import ModbusSource
from .mqtt import MqttSource

__all__ = [
    "AmqpSource",
    "Delivery",
    "Gate",
    "MemorySource",
    "ModbusSource",
    "MqttSource",
    "Source",
]
