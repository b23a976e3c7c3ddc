"""sshjobs benchmarks: `make bench` (python -m bench) against a local lab, see bench/README.md."""
