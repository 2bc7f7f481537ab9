"""workerlease: leases warm-pool worker machines to tenants."""

__version__ = "0.1.0"
