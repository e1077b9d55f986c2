"""fedwarden: federated training of Keras models that holds up when some clients are poisoned.

``fedwarden.simulate(...)``, ``fedwarden.compare(...)`` and ``fedwarden.chain(...)`` are the
Python API (``fedwarden/api.py``); ``fedwarden.RunConfig`` and ``fedwarden.Config`` the settings.
Importing fedwarden loads nothing heavy: TensorFlow loads when a simulation starts.
"""

from fedwarden.config import Config, RunConfig

__all__ = ["Config", "RunConfig", "chain", "compare", "simulate"]


def __getattr__(name: str):
    if name in ("simulate", "compare", "chain"):
        from fedwarden import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedwarden' has no attribute {name!r}")
