"""The per-client records every layer shares: what one client did in one round, and its trust.

Scoring fills a round's rows, trust adds its verdict, the ledger stores them, the wire protocol
carries them and ``fedwarden trust`` prints them; these key tuples are the one place their names
are listed.
"""

LIST_KEYS = ("client_id", "trust", "anomaly", "flagged", "quarantined", "rounds", "last_round",
             "rejected", "evidence", "explanation")  # fmt: skip
"""Keys of each ``trust list --format json`` entry (the first five are the stable contract)."""

HISTORY_KEYS = ("round", "anomaly", "trust", "flagged", "quarantined", "norm", "norm_z", "cosine",
                "distance", "krum_score", "trimmed_share", "loss", "pair_gap", "cluster_outlier",
                "history_error", "evidence", "rejected_reason", "explanation")  # fmt: skip
"""Keys of each round in ``trust show --format json``."""
