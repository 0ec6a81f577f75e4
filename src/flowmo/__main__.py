import sys

from flowmo.cli import main

sys.exit(main())
