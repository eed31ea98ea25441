#!/usr/bin/env python
"""Thin wrapper: see ``yuanlfa-reshard --help``."""

import sys

from yuanlfa.cli.reshard import script

if __name__ == "__main__":
    sys.exit(script())
