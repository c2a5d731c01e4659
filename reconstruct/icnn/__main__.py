"""``python -m reconstruct.icnn``: the iCNN step (all three stages) from the command line."""
import sys

from reconstruct.icnn import main

sys.exit(main())
