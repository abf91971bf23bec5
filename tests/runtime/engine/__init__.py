"""Engine tests. A package so that its conftest.py is imported as engine.conftest and
does not take the place of tests/conftest.py, which top-level tests import by name."""
