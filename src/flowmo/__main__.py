import sys

from flowmo.commands import main

sys.exit(main())
