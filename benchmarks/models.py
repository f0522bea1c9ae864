"""Backbone benchmark of issue 6: DiS-S/2, DiM-S/2, DiffuSSM-S against DiT-S/2 and DiS-B/2 against DiT-B/2, at
256/1024/4096 tokens, fp32 and bf16 autocast; training and sampling images/s, peak memory, Gflops, MFU, ratios.

    python benchmarks/models.py                      # full grid (tens of minutes on 2 cores)
    python benchmarks/models.py --quick              # smoke run
    python benchmarks/models.py --models DiS-S/2:mixer=mamba2 --tokens 1024 --dtype bf16
    python benchmarks/models.py --profile            # top ops of one bf16 training step, DiS-S/2 and DiT-S/2

The measurement itself lives in ``ssmdiff.bench`` (also ``ssmdiff bench``); see its docstring for definitions.
Results go to benchmarks/results/models.json and models.png unless --out says otherwise.
"""

import sys
from pathlib import Path

from ssmdiff.bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main(argv))
