import sys

from ..train.engine import leave_process_group
from .run import main

if __name__ == "__main__":
    status = main()
    leave_process_group()
    sys.exit(status)
