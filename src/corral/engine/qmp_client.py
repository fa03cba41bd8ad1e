"""qemu.qmp's client without the cost of its debug logging when debug logging is off.

qemu.qmp logs every message it sends and receives with ``logger.debug("<-- %s", str(msg))``: the ``str()`` runs
whatever the log level, and it pretty-prints the message with ``json.dumps(indent=2)``, which is CPython's
pure-Python encoder. With 30 idle VMs that was a third of the agent's CPU (usage sampling's ``query-blockstats``
answers are large; benchmarks/idle.py, docs/performance.md). Here the message is formatted only when a debug
record would be emitted.
"""

from __future__ import annotations

import logging

from qemu.qmp import QMPClient
from qemu.qmp.message import Message


class QuietQMPClient(QMPClient):
    """A ``QMPClient`` whose message hooks format a message only for a logger that emits debug records."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg
