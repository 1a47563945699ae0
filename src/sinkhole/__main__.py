"""``python -m sinkhole``: the same command line as the ``sinkhole`` script."""

from .cli import entry

if __name__ == "__main__":
    entry()
