from boothkit.cli import main

raise SystemExit(main())
