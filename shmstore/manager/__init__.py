"""The manager side: the process that owns the store and serves it (lifecycle, dispatcher,
address claim, state file and its keeper, the spool's courier, systemd notifications,
launching one as a child process). Importing the package imports none of them."""
