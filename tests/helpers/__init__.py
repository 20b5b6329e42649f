"""Shared builders for tests (import as ``helpers.<module>`` with ``tests/`` on ``sys.path``)."""
