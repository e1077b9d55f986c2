"""A defended simulation from Python: the same run as `fedwarden simulate`, as one call.

    .venv/bin/python examples/python_api.py [OUT_DIR]

Twenty digits clients, four of them sending Gaussian noise, ten sampled per round and aggregated
by a trimmed mean; then a clipped median applied by hand to three updates.
tests/test_api.py runs this file.
"""

import sys

import numpy as np

import fedwarden

out = sys.argv[1] if len(sys.argv) > 1 else "runs/python-api"

# Settings by their flat names, as in `fedwarden simulate --help` (dashes become underscores).
results = fedwarden.simulate(
    dataset="digits",
    clients=20,
    clients_per_round=10,
    rounds=2,
    local_epochs=1,
    attack="gaussian",
    malicious_fraction=0.2,
    aggregator="trimmed_mean",
    out=out,
    progress=False,
)
final = results["final"]
print(f"accuracy {final['accuracy']:.3f} after {len(results['rounds'])} rounds")
print(
    f"detection precision {final['detection']['precision']}, recall {final['detection']['recall']}"
)
print("flagged:", sorted(c for c, v in results["clients"].items() if v["flagged"]))

# The chain as a step: (updates (K, d), weights (K,), state) -> StepOutput.
robust = fedwarden.chain("clip:max_norm=5+median")
updates = np.array([[1.0, 1.0], [1.2, 0.8], [1000.0, -1000.0]], np.float32)
aggregate = robust(updates, np.ones(3), robust.init()).updates[0]
print("aggregate of two honest updates and one outlier:", aggregate.round(3).tolist())
