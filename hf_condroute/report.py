"""`python -m hf_condroute.report DIR`: the routing report of a saved adapter folder (`hf_condroute.stats.report`)."""

import sys

from .stats.report import main, report  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
