"""What bench.py measures, one module per kind of figure (README "Results").

    steps.py       training and generation steps, memory, the real size on a GPU
    decode.py      frame sampling and the data loader at real size
    gpu.py         `bench.py gpu` and its CPU proxies (host work per step and token, distinct shapes)
    runs.py        whole runs: real widths on the CPU, kills and resumes, the quickstart end to end
    ablations.py   the paper's ablation tables in miniature (`bench.py ablate`)
    plots.py       training curves and the ablation tables as PNG
    targets.py     the target beside each figure
"""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository: train.py, tests/ (the commands run from here)
