from pythia_attribution.cli import main

raise SystemExit(main())
