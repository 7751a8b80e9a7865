import signal
import sys

from benchmarks import nodered_flows
from benchmarks.core import main
from benchmarks.load import end_children

# SIGTERM (a `kill`, a CI timeout) ends a run as Ctrl-C does: through the `finally`
# blocks that stop the servers and workers it started, so that no next run inherits a
# broker still holding sessions and queued messages.
signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))

try:
    if nodered_flows.selected(sys.argv[1:]):
        nodered_flows.main()
    else:
        main()
finally:
    end_children()
