#!/usr/bin/env python
"""Thin wrapper: see ``yuanlfa-reshard --help``."""

import sys

from yuanlfa.cli.reshard import main

if __name__ == "__main__":
    sys.exit(main())
