"""`python -m ustudents.worker` = `ustudents-worker`."""
from .cli import worker_main

worker_main()
