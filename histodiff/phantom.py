"""``python -m histodiff.phantom``: phantom H&E tiles (the code is ``histodiff.cli.make_phantom``)."""

import sys

from histodiff.cli.make_phantom import main

if __name__ == "__main__":
    sys.exit(main())
