"""`python -m loadtest`: the serving benchmark (loadtest/bench_cli.py)."""

import sys

from loadtest.bench_cli import main

sys.exit(main())
