"""Benchmarks and profiling of m3lite next to its peers: `m3lite bench` (bench), the PyTorch row (torch_row) and
`python -m m3bench.profile_engine` (where a prefill's and a decode step's time goes).

This package may import both the runtime (m3lite) and the PyTorch side (converters); m3lite imports it only
inside the `m3lite bench` command.
"""
