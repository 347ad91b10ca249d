"""Builds the ``flowjax_digits`` TFDS dataset offline and prints its splits.

Run::

    python -m experiments.digits.build_data --data_dir /tmp/flowjax_tfds

Expected output: ``flowjax_digits in /tmp/flowjax_tfds: {'train': 1438,
'test': 359}`` and the build time (about a second on a laptop CPU). The
builder lives in :mod:`experiments.digits.dataset`; TFDS needs it in an
importable module, so this command is a separate one.
"""

from __future__ import annotations

import argparse
import time

from experiments.digits.dataset import NAME, build


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="the TFDS data directory")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sources = build(args.data_dir, quiet=False)
    took = time.perf_counter() - start
    sizes = {split: len(src) for split, src in sources.items()}
    print(f"{NAME} in {args.data_dir}: {sizes} ({took:.2f} s)")


if __name__ == "__main__":
    main()
