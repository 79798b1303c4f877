"""Benchmarks: SPARC against a bare asyncpg endpoint and a connection-per-request one."""
