"""The bundled demo corpus: scikit-learn's handwritten digits with captions, Python's stdlib docstrings as
English text, and interleaved documents of both, written as raw JSONL (DESIGN §4). Nothing is downloaded.

    python data_prep/demo_corpus.py --out runs/quickstart/corpus

Writes <out>/images/digits/*.png, <out>/{train,heldout}/{text,pair,interleaved}.jsonl (image paths relative
to <out>/images), <out>/images/{train,heldout}.jsonl (image lists for σ-VAE training) and <out>/corpus.json
(counts; written last). A complete corpus with the same settings is left as it is.
"""

import argparse
import json

from latentlm_mcore.demo.corpus import DemoCorpusConfig, build_demo_corpus


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="corpus folder")
    p.add_argument("--image-size", type=int, default=DemoCorpusConfig.image_size,
                   help="digits are upscaled from 8x8 to this many pixels (the σ-VAE's input size)")
    args = p.parse_args(argv)
    summary = build_demo_corpus(DemoCorpusConfig(out=args.out, image_size=args.image_size))
    print(json.dumps({"out": args.out, "documents": summary["documents"], "digits": summary["digits"]}))


if __name__ == "__main__":
    main()
