"""Testing with corral: a pytest plugin (``corral.testing.pytest_plugin``) that hands each test a fresh VM forked
from a warm template, and the :class:`VM` handle its fixtures yield."""

from corral.testing.handles import VM, ExecResult

__all__ = ["VM", "ExecResult"]
