"""netmemfs_server: the remote page server.

Where it sits: at the bottom of the page's path (serve -> store -> log). It imports the
shared lower modules of netmemfs (errors, pages, protocol) and nothing above them.
"""
