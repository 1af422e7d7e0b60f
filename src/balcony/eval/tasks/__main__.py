"""`python -m balcony.eval.tasks`: write the offline task YAMLs for local PIQA / ARC-Easy / LAMBADA data."""

import sys

from . import main

sys.exit(main())
