"""``python -m histodiff.demo``: the single-site demo (the code is ``histodiff.cli.demo_site``)."""

import sys

from histodiff.cli.demo_site import main

if __name__ == "__main__":
    sys.exit(main())
