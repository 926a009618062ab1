from pfb_train.cli import main

raise SystemExit(main())
