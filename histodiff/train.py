"""``python -m histodiff.train``: single-site training (the code is ``histodiff.cli.train_site``)."""

import sys

from histodiff.cli.train_site import main

if __name__ == "__main__":
    sys.exit(main())
