from uniond.service.daemon import main

raise SystemExit(main())
