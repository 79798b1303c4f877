"""`python -m sparc`: the same as the `sparc` command."""

from sparc.cli import main

raise SystemExit(main())
