"""Datasets: the Matbench tasks (`matbench`), a user's own files (`sources`), folds (`splits`),
and `loading`, which answers for any `data:` section: its rows, its content hash, its folds."""
