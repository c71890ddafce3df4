"""sarft: safe role-play fine-tuning as a self-hosted service."""

__version__ = "0.1.0"
