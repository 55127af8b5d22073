import sys

from autoquant.cli.main import main

sys.exit(main())
