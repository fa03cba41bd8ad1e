"""The control plane: validation against the current state, placement, and turning requests into jobs.

It reads and writes the store only; agents do the work. On one host this runs inside ``corral serve``.
"""
