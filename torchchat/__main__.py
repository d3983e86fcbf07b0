from torchchat.cli import main

raise SystemExit(main())
