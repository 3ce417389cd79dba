"""Every bench's smoke mode: `--smoke` runs it at a tiny size, offline, so that `make test` runs each
one (laion_assets_tests/test_benches.py) and a schema or API change that breaks a bench fails CI. The
figures of a smoke run mean nothing; the full runs stay out of CI."""

import argparse


def parse_args(parser: argparse.ArgumentParser, **tiny: object) -> argparse.Namespace:
    """`parser`'s arguments; with `--smoke`, `tiny` replaces the defaults (arguments given still win)."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a tiny offline run, for CI: {', '.join(f'{k}={v}' for k, v in tiny.items())}",
    )
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**tiny)
        args = parser.parse_args()
    return args
