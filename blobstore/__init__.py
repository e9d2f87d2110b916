"""blobstore: content-addressed blob store with peer-to-peer fetching (see README.md)."""

__version__ = "0.1.0"
"""The release: pyproject.toml's version (tests/test_startup.py checks they match)."""
