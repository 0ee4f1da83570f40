"""``python -m broker`` = ``mq-cli server``."""

from cli.main import main

main(["server", *__import__("sys").argv[1:]])
