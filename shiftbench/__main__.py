from shiftbench.cli import main

raise SystemExit(main())
