"""What the tests (and the benches) use that the library does not: tiny random stand-in pipelines
of each family (`stand_ins`) and instrumentation such as the DDP all-reduce counter
(`instrumentation`).

Not part of the library core: nothing in `lightning_grpo` outside this package imports it at
import time (the family registry names each stand-in builder by a dotted path it resolves only
when a test builds one; tests/packaging/test_core_imports.py checks).
"""
