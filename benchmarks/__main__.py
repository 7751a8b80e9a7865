import sys

from benchmarks import nodered_flows
from benchmarks.core import main

if nodered_flows.selected(sys.argv[1:]):
    nodered_flows.main()
else:
    main()
