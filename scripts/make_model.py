"""Write a DINOv2 model directory with random weights (tests, benchmarks, offline demo).

    python scripts/make_model.py small OUT_DIR        # architecture-exact dinov2-small
    python scripts/make_model.py tiny OUT_DIR         # hidden 32, 2 layers: for tests
    python scripts/make_model.py base OUT_DIR --registers 4

Speed does not depend on weight values, so random weights at the real sizes are
what the benchmarks need; search quality of course does (use real weights for that).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.testing import ARCHITECTURES, save_random_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", choices=sorted(ARCHITECTURES))
    p.add_argument("out", type=Path)
    p.add_argument("--registers", type=int, default=0, help="register tokens (0: plain DINOv2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    save_random_model(a.out, a.arch, registers=a.registers, seed=a.seed)
    print(a.out)


if __name__ == "__main__":
    main()
