"""Channels-style consumers, served with `--interface consumer` (see docs/behaviour.md)."""
