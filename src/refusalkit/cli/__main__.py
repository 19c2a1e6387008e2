import sys

from refusalkit.cli.app import main

sys.exit(main())
