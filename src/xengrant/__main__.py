import sys

from xengrant.cli import main

sys.exit(main())
