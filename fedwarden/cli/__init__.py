"""The ``fedwarden`` command: one module per subcommand, registered explicitly in ``main``."""
