"""``python3 -m tests.bench``: see tests/bench/bench.py."""

import sys

from tests.bench.bench import main

sys.exit(main())
