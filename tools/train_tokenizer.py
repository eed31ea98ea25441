#!/usr/bin/env python
"""Thin wrapper: see ``yuanlfa-train-tokenizer --help``."""

import sys

from yuanlfa.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
