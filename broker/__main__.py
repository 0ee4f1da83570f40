"""``python -m broker`` = ``mq-cli server``."""

import sys

from conveyor.cli.main import main

main(["server", *sys.argv[1:]])
