"""ImageShare: a self-hosted medical image exchange."""

__version__ = "0.1.0"
