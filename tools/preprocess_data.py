"""Tokenize files into a Megatron .bin/.idx pair; a thin wrapper over ``yuanlfa-preprocess``."""

from __future__ import annotations

from yuanlfa.cli.preprocess import main

raise SystemExit(main())
