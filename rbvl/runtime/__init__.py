"""The process and its folders: what every command that writes needs, below training and regroup alike.

- distributed.py  one process or many (torchrun): rank, device, DDP wrap, all-reduce, clean shutdown
- runlock.py      one run per output folder (a lock file with PID and host; a killed run's lock is taken over)
- fsfault.py      file-system faults (full disk, read-only, permissions) as one line naming the fault and the path

Import the module you need (`from rbvl.runtime import runlock`); nothing is re-exported here, so the light modules
load without torch.
"""
