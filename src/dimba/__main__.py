import sys

from dimba.cli import main

sys.exit(main())
