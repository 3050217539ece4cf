import sys

from netmemfs.cli import main

sys.exit(main())
