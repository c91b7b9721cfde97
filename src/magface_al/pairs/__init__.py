"""Identity splits, pair sampling, simulated label noise and feedback files."""

from magface_al.pairs.table import Pairs, read_pairs_csv, write_pairs_csv

__all__ = ["Pairs", "read_pairs_csv", "write_pairs_csv"]
