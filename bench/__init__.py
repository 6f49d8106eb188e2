"""ShopLens's performance benchmark (`make bench`, `python -m bench --help`).

Not a test: it measures, prints a table, and writes ``runs/bench-<timestamp>/`` (figures.json,
bench.png). Every section reports its figures as ratios against a baseline measured in the
same run on the same machine, and records the load average when it started, so a run taken
on a busy machine shows it. Sections: ``e2e``, ``ranking``, ``prefix``, ``retrieval``,
``concurrency``, ``ingest`` (see `bench.cli`).
"""
