"""`python -m fastnn ...` runs the fastnn command."""
import sys

from fastnn.cli import main

sys.exit(main())
