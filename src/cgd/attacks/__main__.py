"""`python -m cgd.attacks …`: generate an attack's resources ahead of a benchmark (see `resources.py`)."""

from .resources import main

raise SystemExit(main())
