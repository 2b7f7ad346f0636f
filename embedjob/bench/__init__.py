"""Benchmarks run as `embedjob bench NAME [...]`: each module here has ``main(argv) -> int`` and
prints ratios measured side by side in one run (no absolute-time targets)."""
