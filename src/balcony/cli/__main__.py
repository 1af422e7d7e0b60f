"""`python -m balcony.cli ...` (what `accelerate launch -m balcony.cli train ...` runs)."""

import sys

from .main import main

sys.exit(main())
