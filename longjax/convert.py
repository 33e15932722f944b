"""`python -m longjax.convert roberta-to-longformer|bart-to-led --src=DIR --out=DIR [...]`.

Thin: flags in, `longjax.hf.conversion` out. A failure prints one
`error:` line and exits 1.
"""

from __future__ import annotations

import argparse
import sys

from longjax.hf import conversion


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m longjax.convert", description=conversion.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    lf = commands.add_parser("roberta-to-longformer", help="RoBERTa checkpoint -> Longformer checkpoint")
    lf.add_argument("--max-positions", type=int, default=4096, help="usable positions (table rows: this + 2)")
    lf.add_argument("--attention-window", type=int, default=512, help="full window per layer, even")
    led = commands.add_parser("bart-to-led", help="BART checkpoint -> LED checkpoint")
    led.add_argument("--max-encoder-positions", type=int, default=16384)
    led.add_argument("--attention-window", type=int, default=1024, help="full window per encoder layer, even")
    for sub in (lf, led):
        sub.add_argument("--src", required=True, help="Hugging Face checkpoint directory to convert")
        sub.add_argument("--out", required=True, help="directory to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "roberta-to-longformer":
            out = conversion.roberta_to_longformer(
                args.src, args.out, max_positions=args.max_positions, attention_window=args.attention_window
            )
        else:
            out = conversion.bart_to_led(
                args.src, args.out, max_encoder_positions=args.max_encoder_positions,
                attention_window=args.attention_window,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
