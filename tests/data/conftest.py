"""Data-layer tests use the session tokenizer fixtures of tests/conftest.py."""
