from cistem_mpi.cli import main

raise SystemExit(main())
