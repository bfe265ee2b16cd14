"""``python -m histodiff.weights fetch|check`` (the code is ``histodiff.cli.weights_tool``)."""

import sys

from histodiff.cli.weights_tool import main

sys.exit(main())
