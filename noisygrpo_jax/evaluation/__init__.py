"""Evaluation: metrics over decoded completions and loaders for local copies of eval benchmarks."""
