"""Guest image builders: turn Debian packages into bootable Corral guest images."""
