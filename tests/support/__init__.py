"""Helpers the tests share: processes, adapters, fault injection."""
