"""Train the demo's Llama-style SentencePiece tokenizer on a generated corpus (offline).

    python -m data_prep.make_tokenizer --corpus data/demo/corpus.txt --out data/demo/tokenizer --vocab-size 600
"""
import argparse
from pathlib import Path

from llava_sft.data.tokenizer_train import train_llama_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="text file, one line per training text")
    ap.add_argument("--out", required=True, help="output tokenizer directory")
    ap.add_argument("--vocab-size", type=int, default=600,
                    help="at least 259 + the number of distinct characters in the corpus (3 special and 256 byte "
                         "pieces); a smaller value is refused with this corpus's exact minimum")
    args = ap.parse_args()
    texts = Path(args.corpus).read_text().splitlines()
    try:
        out = train_llama_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    except ValueError as e:
        raise SystemExit(f"make_tokenizer: {e}") from None
    print(f"tokenizer written to {out}")


if __name__ == "__main__":
    main()
