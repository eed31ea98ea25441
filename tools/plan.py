"""Plan pipeline splits (memory, time, balanced blocks); a thin wrapper over ``yuanlfa-plan``."""

from __future__ import annotations

from yuanlfa.cli.plan import main

raise SystemExit(main())
