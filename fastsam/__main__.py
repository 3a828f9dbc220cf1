from fastsam.cli import main

raise SystemExit(main())
