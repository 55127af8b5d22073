import sys

from autoquant.cli import main

sys.exit(main())
