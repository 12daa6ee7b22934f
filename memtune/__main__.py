"""python -m memtune"""

import sys

from memtune.cli import main

sys.exit(main())
