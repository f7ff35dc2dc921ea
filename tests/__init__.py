"""edgezo's test suite, a package so that pytest puts the checkout's root on sys.path, not tests/: its helpers
import as tests.helpers and tests.tiny_model and cannot shadow an installed package (tests/test_imports.py)."""
