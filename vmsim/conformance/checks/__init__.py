"""The device checks (pytest modules); see vmsim/conformance/__init__.py."""
