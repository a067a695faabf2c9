"""Benchmarks: ``python -m st_adapter_fast bench``.

cli      the command line and the task list
core     timing, memory and roofline of one op call per backend
e2e      the end-to-end train step of a ViT video classifier with 0 / 12 / 24 adapters
report   results.json, report.md and plots
"""
