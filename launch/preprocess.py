"""Tokenise a corpus into a Megatron indexed dataset for ``data.path=megatron:PREFIX``.

    python launch/preprocess.py --input pd_english --output-prefix data/pd_english
    python launch/preprocess.py --input corpus_dir/ --output-prefix data/web --tokenizer tok.model

writes ``PREFIX_text_document.bin`` / ``.idx`` (Megatron-Core ``IndexedDatasetBuilder``, one
document per corpus document, EOS appended), ``PREFIX_text_document.model`` (the tokenizer) and
``PREFIX_text_document.json`` (counts, dtype, tokenizer fingerprint). ``--input`` takes anything
``data.path`` takes (a built-in corpus name, a .jsonl/.json/.txt/.parquet file or directory,
``hf:NAME``). Without ``--tokenizer``, a BPE of ``--vocab-size`` pieces is trained as
``data.tokenizer=auto`` would (on the training split of ``--val-fraction`` / ``--seed``). Bad
input stops with one ``error:`` line and exit code 2. See :mod:`lctrain.data.megatron`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run :func:`lctrain.data.megatron.preprocess_corpus`, print its summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="corpus: a data.path value (file, directory, pd_english, hf:NAME)")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_text_document.{bin,idx,model,json}")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece .model to use (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="pieces of the trained tokenizer (model.vocab_size)")
    parser.add_argument("--text-key", default="text", help="JSON / parquet text column (data.text_key)")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="data.val_fraction the tokenizer split uses")
    parser.add_argument("--seed", type=int, default=1234, help="data.seed the tokenizer split uses")
    parser.add_argument("--cache-dir", default=None, help="datasets cache for reading the corpus")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)

    from lctrain.data.megatron import preprocess_corpus
    from lctrain.errors import ConfigError

    try:
        summary = preprocess_corpus(
            args.input, args.output_prefix, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            text_key=args.text_key, val_fraction=args.val_fraction, seed=args.seed, cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    print(f"train with: data.path=megatron:{args.output_prefix}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
