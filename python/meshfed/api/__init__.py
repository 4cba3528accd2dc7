"""The zone's federation API (FastAPI)."""

from meshfed.api.app import create_app

__all__ = ["create_app"]
