"""The home's layout as the host uses it; the convention itself lives in corral.layout, which the API shares."""

from corral.layout import PRIVATE, SEARCH_ONLY, HostLayout, inside_pool, pool_file

__all__ = ["PRIVATE", "SEARCH_ONLY", "HostLayout", "inside_pool", "pool_file"]
