"""SPARC: an async auth service on one shared, bounded PostgreSQL pool per process."""

__version__ = "0.1.0"
