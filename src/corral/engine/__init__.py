"""One VM process's life: a launch plan in, a QEMU process out, QMP and the guest agent to talk to it.

The engine knows no store, no API and no other host; the host agent drives it.
"""
