"""``python -m fedwarden``: the same as the ``fedwarden`` console script."""

import sys

from fedwarden.cli.main import main

sys.exit(main())
