from sparc.cli import main

raise SystemExit(main())
