from uniond.daemon import main

raise SystemExit(main())
