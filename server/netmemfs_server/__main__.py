import sys

from netmemfs_server.cli import main

sys.exit(main())
