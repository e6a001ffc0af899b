"""Operator scripts; importable so that tests can drive what they do (scripts/fleet.py)."""
