"""`memgen serve` under load beside offline generate (memgen.serve.loadtest):
the repository's entry point, writing to bench/results/ unless told otherwise.

    python bench/bench_serve.py [--tiny] [--model M] [--memgen C] [--concurrency 1 8 32] ...
"""
import sys
from pathlib import Path

from memgen.serve.loadtest import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in argv):
        argv += ["--output-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main(argv))
