"""``python -m vmafs``: the same as the ``vmafs`` console script.

Tests run the CLI this way (``[sys.executable, "-m", "vmafs", ...]``) so they
use the interpreter and the checkout under test, whatever is on PATH.
"""

from vmafs.cli import entry

if __name__ == "__main__":
    entry()
