"""What the paper does not describe but every command needs.

    files.py      atomic writes; JSON and text read with one line naming the file; the weight-file names
    outputs.py    what a command may write, and over what: no folder replaced, no result overwritten unsaid
    cli.py        how the commands start and end: flags checked when read, one line on bad input
    rundir.py     a training run's directory: the lock, the starting point, resume, save
    released.py   the released checkpoints' layouts (E.T.Chat stage 2, D2VLM) and the export to them
"""
